"""Photometric and geometric augmentation of labeled images with albumentations (``train.augment``).

Masks move with their image by nearest-neighbour resampling, so every mask value stays a class index or the
ignore value; pixels a rotation or shift brings in from outside the image are ignore (255), not a class. Each
call draws its seed from torch's RNG, which segflow seeds per (seed, epoch, position) before each sample
(segflow.training.distributed.SeededDataset): the same sample of the same epoch is augmented the same way again, so a
resumed training repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from segflow import IGNORE_INDEX
from segflow.config import AugmentParams


class LabeledAugment:
    """The albumentations pipeline that ``train.augment``'s probabilities switch on (geometric, then photometric)."""

    def __init__(self, cfg: AugmentParams) -> None:
        import albumentations as A
        import cv2

        exact = {"mask_interpolation": cv2.INTER_NEAREST, "border_mode": cv2.BORDER_CONSTANT, "fill": 0,
                 "fill_mask": IGNORE_INDEX}
        self.compose = A.Compose([
            A.Rotate(limit=cfg.rotate_limit, p=cfg.rotate, **exact),
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), p=cfg.shift_scale_rotate,
                     **exact),
            A.ElasticTransform(alpha=30, sigma=6, p=cfg.elastic, **exact),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=cfg.brightness_contrast),
            A.HueSaturationValue(hue_shift_limit=20, sat_shift_limit=30, val_shift_limit=20, p=cfg.hue_saturation),
        ], seed=0)

    @staticmethod
    def from_params(cfg: AugmentParams | None) -> LabeledAugment | None:
        """None when every probability is 0 (the default), so nothing is imported or drawn."""
        on = cfg is not None and any((cfg.rotate, cfg.shift_scale_rotate, cfg.elastic, cfg.brightness_contrast,
                                      cfg.hue_saturation))
        return LabeledAugment(cfg) if on else None

    def __call__(self, pixels: np.ndarray, mask: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """``pixels``: H x W x 3 uint8; ``mask``: H x W class indices (255: ignore)."""
        self.compose.set_random_seed(int(torch.randint(2**31 - 1, ())))
        out = self.compose(image=pixels, mask=mask.numpy().astype(np.uint8))
        return out["image"], torch.from_numpy(out["mask"]).long()
