"""Albumentations on labeled images (train.augment): masks stay exact, the ignore value survives, and a sample's
augmentation depends only on its (seed, epoch, position) seed, so a resumed training repeats the first."""

from __future__ import annotations

import numpy as np
import torch

from segflow import IGNORE_INDEX
from segflow.config import AugmentParams
from segflow.data.augment import LabeledAugment
from segflow.data.datasets import Sample, SegmentationDataset
from segflow.data.imageio import write_image, write_mask
from segflow.training.distributed import SeededDataset, seeded

GEOMETRIC = AugmentParams(rotate=1.0, rotate_limit=30, shift_scale_rotate=1.0, elastic=1.0)


def _pair(size: int = 40) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[5:20, 5:30], mask[22:35, 10:25], mask[:, 36:] = 1, 2, IGNORE_INDEX
    return pixels, mask


def test_geometric_transforms_keep_mask_values_and_fill_with_ignore():
    pixels, mask = _pair()
    with seeded(3):
        image, moved = LabeledAugment(GEOMETRIC)(pixels, mask)
    assert image.shape == pixels.shape and moved.shape == mask.shape and not torch.equal(moved, mask)
    assert set(moved.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}  # nearest neighbour: no blended labels
    assert moved[0, 0] == moved[-1, 0] == IGNORE_INDEX  # a 30-degree turn brings in corners from outside
    assert (moved == 1).any() and (moved == 2).any()


def test_photometric_transforms_change_the_image_and_leave_the_mask_alone():
    pixels, mask = _pair()
    with seeded(0):
        image, same = LabeledAugment(AugmentParams(brightness_contrast=1.0, hue_saturation=1.0))(pixels, mask)
    assert torch.equal(same, mask) and not np.array_equal(image, pixels)


def test_a_samples_augmentation_follows_its_seed_alone(tmp_path):
    pixels, mask = _pair()
    write_image(tmp_path / "a.png", pixels)
    write_mask(tmp_path / "a_mask.png", mask.numpy().astype(np.uint8))
    dataset = SeededDataset(SegmentationDataset([Sample("a", tmp_path / "a.png", tmp_path / "a_mask.png")],
                                                crop_size=32, augment=GEOMETRIC.model_copy(update={"brightness_contrast": 1.0})))
    first, again, other = dataset[(11, 0)], dataset[(11, 0)], dataset[(12, 0)]
    torch.manual_seed(99)  # whatever the training's own RNG did in between does not matter
    later = dataset[(11, 0)]
    for key in ("image", "mask"):
        assert torch.equal(first[key], again[key]) and torch.equal(first[key], later[key])
    assert not torch.equal(first["image"], other["image"])


def test_all_probabilities_zero_builds_nothing():
    assert LabeledAugment.from_params(AugmentParams()) is None and LabeledAugment.from_params(None) is None
