"""Weak-to-strong consistency on the unlabeled images while training (``train.consistency``).

FixMatch (Sohn et al., NeurIPS 2020) as UniMatch (Yang et al., CVPR 2023) applies it to segmentation: each
training batch comes with a batch of unlabeled crops; the model's own prediction on the weakly augmented crop
(scale, crop, flip), where it is confident, is the target of the same crop strongly perturbed (colour jitter,
grayscale, blur) and CutMix-ed with another unlabeled crop. Unlike the offline pseudo-labels of the
``pseudo_label`` stage, the targets improve as the model does, and every unlabeled image regularises the model
from the first step.

The targets are the teacher's probabilities with the labeled loss's class prior undone (``segflow.training.targets``, as
the offline pseudo-labels are), thresholded globally or per class (CBST), and the unlabeled loss weighs classes
as the labeled one does (``train.unlabeled_class_weighting: full``): a class-weighted teacher's inflated
rare-class probabilities are not trusted as they are. They are predicted in eval mode (no dropout, batch-norm running statistics), by the Mean Teacher (an EMA
of the weights, ``train.ema``) when there is one, else by the model itself; the strong views get a forward pass
of their own that leaves the running statistics alone, so the statistics evaluation uses come from clean images
(separate batch norm for strong views: Yuan et al., ICCV 2021).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from segflow import IGNORE_INDEX
from segflow.config import ConsistencyParams, StrongAugmentParams
from segflow.data.datasets import SegmentationDataset, chance, normalize, random_box, strong_augment, to_unit_float
from segflow.training.distributed import EpochSampler
from segflow.training.losses import weighted_cross_entropy
from segflow.training.targets import class_thresholds, confidence_histograms, corrected

VOID_TRUTH = -1  # a hidden mask's void pixels while augmenting: told apart from the crop's padding (IGNORE_INDEX)


class UnlabeledViews(SegmentationDataset):
    """An unlabeled image's weakly augmented crop (``weak``), the same crop strongly perturbed (``strong``), which
    of its pixels are image rather than padding (``valid``), the box another crop is pasted into (``box``) and,
    where a protocol hid the image's mask, the crop's true classes (``truth``: to score the targets, never to
    train; ignore elsewhere)."""

    def __init__(self, samples, *, crop_size, augment, strong: StrongAugmentParams, cutmix: float, cache=None):
        # No cutout: CutMix's box takes its place, and its pixels get a target.
        super().__init__(samples, crop_size=crop_size, augment=augment,
                         strong_augment=strong.model_copy(update={"cutout": 0}), cache=cache)
        self.cutmix = cutmix

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        pixels = self._read_image(sample)
        if sample.mask_path is None:  # nothing known: every pixel void
            truth = torch.full(pixels.shape[:2], VOID_TRUTH, dtype=torch.long)
        else:
            truth = torch.from_numpy(self._read_mask(sample)).long()
            truth[truth == IGNORE_INDEX] = VOID_TRUTH
        image, truth = self._augment(to_unit_float(pixels), truth)
        valid = truth != IGNORE_INDEX  # the crop's padding is IGNORE_INDEX
        truth = truth.where(valid & (truth != VOID_TRUTH), IGNORE_INDEX)
        strong, _ = strong_augment(image, truth, self.strong_augment)
        box = torch.zeros(image.shape[1:], dtype=torch.bool)
        if chance(self.cutmix):
            box[random_box(*image.shape[1:])] = True
        # Padding stays the mean colour (0 once normalised) in the strong view too, as in the weak one.
        return {"weak": normalize(image), "strong": normalize(strong).where(valid, 0), "valid": valid, "box": box,
                "truth": truth}


def unlabeled_batches(loader: DataLoader, first: int) -> Iterator[dict[str, torch.Tensor]]:
    """Unlabeled batches without end, one per training batch, starting at the training's batch ``first``
    (counted over all epochs): a resumed training gets the batches it would have had. ``loader.sampler`` is an
    :class:`EpochSampler`."""
    sampler: EpochSampler = loader.sampler
    per_epoch = len(loader)
    epoch, skip = divmod(first, per_epoch)
    while True:
        sampler.set_epoch(epoch + 1, start=skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0


@dataclass
class ConsistencyTargets:
    strong: torch.Tensor      # Bx3xHxW strong views, CutMix applied
    target: torch.Tensor      # BxHxW class the weak view predicts
    confident: torch.Tensor   # BxHxW bool: confidence at least its class's threshold, on image pixels
    valid: torch.Tensor       # BxHxW bool: image pixels (not the crop's padding)
    truth: torch.Tensor       # BxHxW true class where a protocol hid the mask, else ignore (scoring only)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (dropout off, batch norm on its running statistics), its own mode back after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def batchnorm_statistics_frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Batch norm normalises with the batch's own statistics, as in training, but leaves the running statistics
    (what evaluation uses) as they are: for the strongly perturbed views."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield model
    finally:
        for norm in norms:
            norm.track_running_stats = True


def consistency_targets(
    teacher: nn.Module, batch: dict[str, torch.Tensor], cfg: ConsistencyParams, device: torch.device,
    class_weight: torch.Tensor | None = None,
) -> ConsistencyTargets:
    """Predict the weak views with ``teacher`` in eval mode (no gradient), undo the prior that ``class_weight``
    (the labeled loss's) put in its probabilities, keep the pixels at or above their class's threshold, and
    CutMix the strong views and their targets alike: crop ``b``'s box comes from crop ``b + 1`` (wrapping
    round), as do the targets inside it."""
    weak = batch["weak"].to(device, non_blocking=True)
    strong = batch["strong"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    box = batch["box"].to(device, non_blocking=True)
    truth = batch["truth"].to(device, non_blocking=True)
    with torch.no_grad(), evaluating(teacher):
        output = teacher(weak)
        logits = output["out"] if isinstance(output, dict) else output
        confidence, target = corrected(logits.float().softmax(1), class_weight, 1.0).max(1)
    threshold = cfg.threshold
    if cfg.class_balanced:  # the histograms only then: this runs every training step
        histograms = confidence_histograms(target[valid], confidence[valid], logits.shape[1])
        threshold = class_thresholds(histograms, cfg.threshold, cfg.class_keep_fraction)[target]
    confident = (confidence >= threshold) & valid

    def mixed(tensor: torch.Tensor) -> torch.Tensor:
        other = tensor.roll(-1, dims=0)
        return torch.where(box[:, None] if tensor.dim() == 4 else box, other, tensor)

    return ConsistencyTargets(mixed(strong), mixed(target), mixed(confident), mixed(valid), mixed(truth))


def consistency_loss(
    logits: torch.Tensor, targets: ConsistencyTargets, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy on the confident pixels, averaged over all image pixels (UniMatch): a model that is
    confident nowhere gets no unlabeled loss, rather than a loss from a few pixels. ``class_weight`` is
    ``train.unlabeled_class_weighting``'s (by default the labeled loss's: the targets are prior-corrected, so the
    student learns the same weighted probabilities on both)."""
    return weighted_cross_entropy(logits, targets.target, targets.confident, targets.valid, class_weight)


def sigmoid_rampup(step: int, rampup_steps: float) -> float:
    """Mean Teacher's ramp-up of the unlabeled weight: ``exp(-5 (1 - t)^2)`` for ``t = step / rampup_steps``, 1 after."""
    if rampup_steps <= 0 or step >= rampup_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / rampup_steps) ** 2)


class TargetStatistics:
    """Per class, over the unlabeled pixels since the last :meth:`summary`: how many the teacher gives the
    class, how many of those pass its threshold, and, where a protocol hid the masks, how many of the passing
    ones are right: whether the targets can be trusted, before trusting them."""

    def __init__(self, num_classes: int, device: torch.device):
        self.counts = torch.zeros(4, num_classes, dtype=torch.long, device=device)

    def update(self, targets: ConsistencyTargets) -> None:
        num_classes = self.counts.shape[1]
        scored = targets.confident & (targets.truth != IGNORE_INDEX)
        for row, pixels in enumerate((targets.valid, targets.confident, scored,
                                      scored & (targets.target == targets.truth))):
            self.counts[row] += torch.bincount(targets.target[pixels], minlength=num_classes)

    def summary(self, classes: list[str]) -> dict[str, float]:
        """``unlabeled_confident`` (share of the image pixels that teach) and ``unlabeled_confident.CLASS``
        (share of the class's pixels that pass); with hidden masks, ``unlabeled_precision`` and
        ``unlabeled_precision.CLASS`` (share of the passing pixels whose class is right). Then reset."""
        predicted, confident, scored, correct = self.counts.double().cpu()
        self.counts.zero_()
        record = {"unlabeled_confident": float(confident.sum() / predicted.sum().clamp_min(1))}
        record |= {f"unlabeled_confident.{name}": float(confident[c] / predicted[c])
                   for c, name in enumerate(classes) if predicted[c]}
        if scored.sum():
            record["unlabeled_precision"] = float(correct.sum() / scored.sum())
            record |= {f"unlabeled_precision.{name}": float(correct[c] / scored[c])
                       for c, name in enumerate(classes) if scored[c]}
        return record
