"""Datasets over the ingest contract (``manifest.csv``, ``masks/``, ``classes.json``) and the splits file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from segflow import IGNORE_INDEX
from segflow.config import AugmentParams
from segflow.errors import SegflowError
from segflow.imageio import read_image, read_mask
from segflow.split import read_manifest

# ImageNet statistics: the convention pretrained encoders expect, harmless from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    image_id: str
    image_path: Path
    mask_path: Path | None
    pseudo: bool = False


def read_classes(data_dir: Path) -> list[str]:
    path = Path(data_dir) / "classes.json"
    try:
        return list(json.loads(path.read_text())["names"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        raise SegflowError(f"{path}: cannot read class names ({exc}); run the ingest stage first.") from None


def load_samples(data_dir: Path, splits_csv: Path, split: str) -> list[Sample]:
    """Samples of one split (``train``, ``val``, ``test`` or ``unlabeled``), in manifest order."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    splits = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    chosen = set(splits.loc[splits["split"] == split, "image_id"])
    rows = manifest[manifest["image_id"].isin(chosen)]
    return [
        Sample(
            image_id=row.image_id,
            image_path=data_dir / row.image_path,
            mask_path=(data_dir / row.mask_path) if row.mask_path else None,
        )
        for row in rows.itertuples()
    ]


def load_pseudo_samples(pseudo_dir: Path) -> list[Sample]:
    """Unlabeled images paired with the teacher's pseudo masks (written by the pseudo_label stage)."""
    pseudo_dir = Path(pseudo_dir)
    frame = pd.read_csv(pseudo_dir / "pseudo_manifest.csv", dtype=str, keep_default_na=False)
    return [
        Sample(row.image_id, pseudo_dir / row.image_path, pseudo_dir / row.mask_path, pseudo=True)
        for row in frame.itertuples()
    ]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (tensor - mean) / std


class SegmentationDataset(Dataset):
    """Whole images for evaluation; random scale, crop and flip for training (torch RNG, so seeded runs repeat)."""

    def __init__(self, samples: list[Sample], *, crop_size: int | None = None, augment: AugmentParams | None = None):
        self.samples = samples
        self.crop_size = crop_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = to_tensor(read_image(sample.image_path))
        if sample.mask_path is None:
            mask = torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.long)
        else:
            mask = torch.from_numpy(read_mask(sample.mask_path)).long()
            if mask.shape != image.shape[1:]:
                raise SegflowError(
                    f"{sample.mask_path}: mask is {tuple(mask.shape)} but its image {sample.image_path} is "
                    f"{tuple(image.shape[1:])} (height, width)."
                )
        if self.augment is not None:
            image, mask = self._augment(image, mask)
        return {"image": image, "mask": mask, "pseudo": torch.tensor(sample.pseudo), "index": torch.tensor(index),
                "size": torch.tensor(image.shape[1:])}

    def _augment(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.augment
        scale = aug.scale_min + (aug.scale_max - aug.scale_min) * torch.rand(()).item()
        height, width = (max(1, round(s * scale)) for s in image.shape[1:])
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        if self.crop_size:
            image, mask = _random_crop(image, mask, self.crop_size)
        if aug.hflip and torch.rand(()).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def _random_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad_h, pad_w = max(0, size - image.shape[1]), max(0, size - image.shape[2])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    top = int(torch.randint(0, image.shape[1] - size + 1, ()))
    left = int(torch.randint(0, image.shape[2] - size + 1, ()))
    return image[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]


def stack_padded(tensors: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Stack tensors of different heights and widths (last two dimensions), padding bottom/right with ``value``."""
    height = max(t.shape[-2] for t in tensors)
    width = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])


def pad_collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples of different sizes by padding to the largest (images with 0, masks with ignore)."""
    return {
        "image": stack_padded([item["image"] for item in batch]),
        "mask": stack_padded([item["mask"] for item in batch], IGNORE_INDEX),
        "pseudo": torch.stack([item["pseudo"] for item in batch]),
        "index": torch.stack([item["index"] for item in batch]),
        "size": torch.stack([item["size"] for item in batch]),
    }
