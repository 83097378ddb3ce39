"""Class statistics of the labeled masks: median-frequency weights and the prior the class scores start at."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from segflow import IGNORE_INDEX, models
from segflow.config import TrainParams
from segflow.data.datasets import (
    Sample,
)
from segflow.data.imageio import read_mask

log = logging.getLogger(__name__)


def class_pixels(samples: list[Sample], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its labeled pixels, and the pixels of the images it appears in (void excluded)."""
    pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for sample in samples:
        labels = read_mask(sample.mask_path)
        labels = labels[labels != IGNORE_INDEX]
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += labels.size
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> torch.Tensor:
    """SegNet's median frequency balancing: ``median(freq) / freq[c]``, where ``freq[c]`` is the class's pixels
    over the pixels of the images it appears in (classes never seen get weight 1)."""
    frequency = pixels / np.maximum(image_pixels, 1)
    seen = frequency > 0
    weights = np.ones(len(pixels))
    if seen.any():
        weights[seen] = np.median(frequency[seen]) / frequency[seen]
    return torch.tensor(weights, dtype=torch.float32)


def prior_bias(pixels: np.ndarray, class_weight: torch.Tensor | None) -> torch.Tensor:
    """The class scores' offsets whose softmax is the (class-weighted) share of each class's labeled pixels: the
    constant prediction that minimises the loss, so training starts from it (Lin et al. 2017, §4.1). One pixel
    is added to every class, so that a class absent from the training masks gets a finite offset."""
    share = torch.tensor(pixels + 1, dtype=torch.float32)
    if class_weight is not None:
        share = share * class_weight.cpu()
    log_share = (share / share.sum()).log()
    return log_share - log_share.mean()


def unlabeled_class_weight(class_weight: torch.Tensor | None, setting: str) -> torch.Tensor | None:
    """``train.unlabeled_class_weighting``: the labeled loss's class weights on pseudo-labeled and unlabeled
    pixels, their square root, or none."""
    if class_weight is None or setting == "none":
        return None
    return class_weight.sqrt() if setting == "sqrt" else class_weight


@dataclass
class ClassBalance:
    weight: torch.Tensor | None  # median-frequency weights ** train.class_weight_power (train.class_weighting)
    prior_layer: str | None      # the layer whose bias starts at the class prior (train.prior_init)


def class_balance(cfg: TrainParams, samples: list[Sample], num_classes: int, model: nn.Module, device: torch.device,
                  *, warm_started: bool) -> ClassBalance:
    """The class weights and the prior initialisation of one training. Class statistics come from the labeled
    training masks only: pseudo-labels would echo the teacher's bias. A warm start keeps its head's bias (and a
    resumed training loads its checkpoint over the prior)."""
    prior_init = cfg.prior_init and not warm_started
    weight, prior_layer = None, None
    if cfg.class_weighting or prior_init:
        pixels, image_pixels = class_pixels(samples, num_classes)
        if cfg.class_weighting:
            weight = (median_frequency_weights(pixels, image_pixels) ** cfg.class_weight_power).to(device)
        if prior_init:
            prior_layer = models.init_output_bias(model, prior_bias(pixels, weight).to(device))
            log.info("%s", f"{prior_layer}.bias starts at the class prior" if prior_layer else
                     "no layer's bias reaches the class scores unchanged; train.prior_init does not apply")
    return ClassBalance(weight, prior_layer)
