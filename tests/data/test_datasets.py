"""Samples as the training reads them: strong augmentation of pseudo-labeled images."""

from __future__ import annotations

import torch

from segflow import IGNORE_INDEX
from segflow.config import StrongAugmentParams
from segflow.data.datasets import (
    strong_augment,
)


def test_cutout_blanks_a_box_whose_pixels_the_loss_ignores():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 50)
    mask = torch.randint(0, 4, (40, 50))
    only_cutout = StrongAugmentParams(color_jitter=0, grayscale=0, blur=0, cutout=1)
    out_image, out_mask = strong_augment(image, mask, only_cutout)
    box = out_mask == IGNORE_INDEX
    assert 0 < box.sum() < box.numel()
    assert torch.equal(out_mask[~box], mask[~box]) and torch.equal(out_image[:, ~box], image[:, ~box])
    assert not torch.equal(out_image[:, box], image[:, box])

    nothing = StrongAugmentParams(color_jitter=0, grayscale=0, blur=0, cutout=0)
    assert all(torch.equal(a, b) for a, b in zip(strong_augment(image, mask, nothing), (image, mask)))


def test_photometric_perturbations_change_the_image_but_never_the_mask():
    torch.manual_seed(1)
    image, mask = torch.rand(3, 32, 32), torch.randint(0, 4, (32, 32))
    photometric = StrongAugmentParams(color_jitter=1, grayscale=1, blur=1, cutout=0)
    out_image, out_mask = strong_augment(image, mask, photometric)
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_image, image) and out_image.min() >= 0 and out_image.max() <= 1
