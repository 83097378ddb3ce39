"""Datasets over the ingest contract (``manifest.csv``, ``masks/``, ``classes.json``) and the splits file."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from segflow import IGNORE_INDEX, MEAN, STD
from segflow.config import AugmentParams, StrongAugmentParams
from segflow.data.augment import LabeledAugment
from segflow.data.imageio import read_image, read_mask
from segflow.data.manifest import read_manifest
from segflow.errors import SegflowError

if TYPE_CHECKING:
    from segflow.data.decoded_cache import DecodedCache

# ImageNet statistics: the convention pretrained encoders expect, harmless from scratch.


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
    try:
        splits = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SegflowError(f"{splits_csv}: no split file; run the split stage first (segflow split).") from None
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


def load_pseudo_samples(pseudo_dir: Path, reliable_fraction: float = 1.0) -> list[Sample]:
    """Unlabeled images paired with the teacher's pseudo masks (written by the pseudo_label stage).

    With ``reliable_fraction`` below 1, only that share of the images, the most reliable first (the manifest's
    ``reliability`` column, ST++), is returned.
    """
    pseudo_dir = Path(pseudo_dir)
    frame = pd.read_csv(pseudo_dir / "pseudo_manifest.csv", dtype=str, keep_default_na=False)
    if reliable_fraction < 1 and "reliability" in frame.columns:
        frame = frame.assign(score=pd.to_numeric(frame["reliability"])).sort_values("score", ascending=False, kind="stable")
        frame = frame.head(max(1, round(len(frame) * reliable_fraction)))
    return [
        Sample(row.image_id, pseudo_dir / row.image_path, pseudo_dir / row.mask_path, pseudo=True)
        for row in frame.itertuples()
    ]


def to_unit_float(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor - _MEAN) / _STD


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised 3xHxW float."""
    return normalize(to_unit_float(image))


class SegmentationDataset(Dataset):
    """Whole images for evaluation; random scale, crop and flip for training (torch RNG, so seeded runs repeat).

    Pseudo-labeled images also get ``strong_augment`` (colour jitter, grayscale, blur, cutout), so the student
    must do more than copy its teacher (ST++).

    With a ``cache`` (segflow.stages.cache) images and ingested masks come from it instead of being decoded; pseudo
    masks, written after the cache, are still decoded.

    With ``batch_augment`` the scale, crop and flip are left to :class:`BatchAugment` on the training device:
    samples are the whole uint8 image and mask (see :meth:`_unaugmented`) with the uniforms that decide them.
    """

    def __init__(
        self,
        samples: list[Sample],
        *,
        crop_size: int | None = None,
        augment: AugmentParams | None = None,
        strong_augment: StrongAugmentParams | None = None,
        cache: DecodedCache | None = None,
        batch_augment: bool = False,
    ):
        self.samples = samples
        self.crop_size = crop_size
        self.augment = augment
        self.strong_augment = strong_augment
        self.cache = cache
        self.batch_augment = batch_augment
        self.labeled_augment = LabeledAugment.from_params(augment)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        pixels = self._read_image(sample)
        if sample.mask_path is None:
            mask = torch.full(pixels.shape[:2], IGNORE_INDEX, dtype=torch.long)
        else:
            mask = torch.from_numpy(self._read_mask(sample)).long()
            if mask.shape != pixels.shape[:2]:
                raise SegflowError(
                    f"{sample.mask_path}: mask is {tuple(mask.shape)} but its image {sample.image_path} is "
                    f"{pixels.shape[:2]} (height, width)."
                )
        if self.labeled_augment is not None and sample.mask_path is not None and not sample.pseudo:
            pixels, mask = self.labeled_augment(pixels, mask)
        if self.batch_augment:
            return self._unaugmented(sample, index, pixels, mask)
        image = to_unit_float(pixels)
        if self.augment is not None:
            image, mask = self._augment(image, mask)
        if sample.pseudo and self.strong_augment is not None:
            image, mask = strong_augment(image, mask, self.strong_augment)
        return {"image": normalize(image), "mask": mask, "pseudo": torch.tensor(sample.pseudo), "index": torch.tensor(index),
                "size": torch.tensor(image.shape[1:])}

    def _unaugmented(
        self, sample: Sample, index: int, pixels: np.ndarray, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """uint8 3xHxW image and HxW mask: a quarter of float32's bytes to collate, pin and copy to the device,
        where :class:`BatchAugment` normalises them. A pseudo-labeled image's strong augmentation stays here on the
        CPU, per image, before the scale and crop (so cutout's box is drawn on the whole image), quantised back to
        uint8. The augmentation's uniforms are drawn here, under the sample's seed (segflow.training.distributed)."""
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        if sample.pseudo and self.strong_augment is not None:
            unit, mask = strong_augment(image.float().div_(255), mask, self.strong_augment)
            image = unit.mul_(255).round_().to(torch.uint8)
        return {"image": image.contiguous(), "mask": mask.to(torch.uint8), "pseudo": torch.tensor(sample.pseudo),
                "index": torch.tensor(index), "size": torch.tensor(image.shape[1:]),
                "augment_draws": torch.rand(AUGMENT_DRAWS)}

    def _read_image(self, sample: Sample) -> np.ndarray:
        return self.cache.image(sample.image_id) if self.cache is not None else read_image(sample.image_path)

    def _read_mask(self, sample: Sample) -> np.ndarray:
        if self.cache is not None and not sample.pseudo:
            return self.cache.mask(sample.image_id)
        return read_mask(sample.mask_path)

    def _augment(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.augment
        scale = _uniform(aug.scale_min, aug.scale_max)
        height, width = (max(1, round(s * scale)) for s in image.shape[1:])
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        if self.crop_size:
            image, mask = _random_crop(image, mask, self.crop_size)
        if aug.hflip and torch.rand(()).item() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


AUGMENT_DRAWS = 4  # uniforms per image for BatchAugment: scale, crop top, crop left, flip


def batch_augment_on(setting: bool | str, device: torch.device) -> bool:
    """``train.batch_augment``: ``auto`` is on CUDA only, where per-image CPU work in the loader would starve the
    GPU; on the CPU both run on the same cores and the per-image path does less work (no padding to the batch)."""
    return setting is True or (setting == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class BatchAugment:
    """:meth:`SegmentationDataset._augment`'s random scale, crop to ``crop_size`` and horizontal flip for a whole
    batch at once, on the batch's device: one bilinear ``grid_sample`` for the images, one gather for the masks.

    Each output pixel maps back to a point of its own image, as resizing by the drawn scale (bilinear with
    ``align_corners=False``, as the per-image path, clamped to the image's edges), padding bottom/right to the
    crop and cropping would: pixels beyond the scaled image (padding, or the batch's padding to its largest
    image) become the mean colour (0 once normalised) and the ignore index in the mask. Masks are sampled at
    the nearest pixel centre (``nearest-exact``), so they stay aligned with the image within half a pixel.
    """

    augment: AugmentParams
    crop_size: int

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, sizes: torch.Tensor, draws: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 Bx3xHxW images and BxHxW masks (each image in the top-left ``sizes[b]`` = (height, width)),
        ``draws`` Bx4 uniforms in [0, 1) -> normalised float Bx3xCxC images and long BxCxC masks."""
        device, crop, aug = images.device, self.crop_size, self.augment
        sizes = sizes.to(device, torch.float32, non_blocking=True)
        draws = draws.to(device, torch.float32, non_blocking=True)
        scale = aug.scale_min + (aug.scale_max - aug.scale_min) * draws[:, :1]
        scaled = (sizes * scale).round().clamp_min(1)  # (height, width) after resizing, as the per-image path
        room = (scaled - crop).clamp_min(0)
        start = (draws[:, 1:3] * (room + 1)).floor().minimum(room)  # crop's top and left
        steps = torch.arange(crop, device=device, dtype=torch.float32)
        flipped = torch.where(draws[:, 3:] < 0.5, crop - 1 - steps, steps) if aug.hflip else steps
        row_inside, row_linear, row_nearest = _source(start[:, :1] + steps, sizes[:, :1], scaled[:, :1])
        col_inside, col_linear, col_nearest = _source(start[:, 1:] + flipped, sizes[:, 1:], scaled[:, 1:])
        height, width = images.shape[-2:]
        grid = torch.stack(torch.broadcast_tensors(  # grid_sample's (x, y) in [-1, 1] over the padded batch
            (col_linear * 2 / max(width - 1, 1) - 1)[:, None, :], (row_linear * 2 / max(height - 1, 1) - 1)[:, :, None]
        ), dim=-1)
        sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
        inside = row_inside[:, :, None] & col_inside[:, None, :]
        mean, std = _mean_std_on(device)
        image = (sampled.div_(255) - mean) / std
        image = torch.where(inside[:, None], image, 0)
        batch = torch.arange(images.shape[0], device=device)[:, None, None]
        mask = masks[batch, row_nearest[:, :, None], col_nearest[:, None, :]].long()
        return image, mask.masked_fill_(~inside, IGNORE_INDEX)


@functools.cache
def _mean_std_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's constants on ``device``, copied once: a copy from pageable memory each batch would
    wait for the GPU."""
    return _MEAN.to(device), _STD.to(device)


def _source(
    positions: torch.Tensor, size: torch.Tensor, scaled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, for positions in the image resized from ``size`` to ``scaled`` pixels: whether each lies
    in the resized image, the bilinear source coordinate (``F.interpolate``'s with
    ``align_corners=False``, clamped to the image) and the nearest-exact source index."""
    ratio = size / scaled
    centre = (positions + 0.5) * ratio
    linear = (centre - 0.5).clamp_min(0).minimum(size - 1)
    nearest = centre.floor().minimum(size - 1).long()
    return positions < scaled, linear, nearest


def chance(probability: float) -> bool:
    return probability > 0 and torch.rand(()).item() < probability


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def strong_augment(
    image: torch.Tensor, mask: torch.Tensor, params: StrongAugmentParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """ST++'s strong perturbations of a 3xHxW [0, 1] image; cutout's box is ignored by the loss."""
    import torchvision.transforms.v2.functional as TF  # seconds to import: only where the unlabeled images are used
    if chance(params.color_jitter):  # ColorJitter(0.5, 0.5, 0.5, 0.25)
        image = TF.adjust_brightness(image, _uniform(0.5, 1.5))
        image = TF.adjust_contrast(image, _uniform(0.5, 1.5))
        image = TF.adjust_saturation(image, _uniform(0.5, 1.5))
        image = TF.adjust_hue(image, _uniform(-0.25, 0.25))
    if chance(params.grayscale):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if chance(params.blur):
        sigma = _uniform(0.1, 2.0)
        image = TF.gaussian_blur(image, kernel_size=2 * math.ceil(2 * sigma) + 1, sigma=sigma)
    if chance(params.cutout):
        rows, cols = random_box(*image.shape[1:])
        image = image.clone()
        image[:, rows, cols] = torch.rand(3, 1, 1)
        mask = mask.clone()
        mask[rows, cols] = IGNORE_INDEX
    return image.clamp(0, 1), mask


def random_box(height: int, width: int) -> tuple[slice, slice]:
    """Cutout's and CutMix's box: 2% to 40% of the image, aspect ratio 0.3 to 3.3, anywhere inside it."""
    area = _uniform(0.02, 0.4) * height * width
    aspect = math.exp(_uniform(math.log(0.3), math.log(1 / 0.3)))
    box_h = min(height, max(1, round(math.sqrt(area * aspect))))
    box_w = min(width, max(1, round(math.sqrt(area / aspect))))
    top = int(torch.randint(0, height - box_h + 1, ()))
    left = int(torch.randint(0, width - box_w + 1, ()))
    return slice(top, top + box_h), slice(left, left + box_w)


def _random_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad_h, pad_w = max(0, size - image.shape[1]), max(0, size - image.shape[2])
    if pad_h or pad_w:
        # pad with the mean colour, which normalises to 0
        image = F.pad(image - _MEAN, (0, pad_w, 0, pad_h)) + _MEAN
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
    """Stack samples of different sizes by padding to the largest (images with 0, masks with ignore); the other
    fields are stacked as they are."""
    padding = {"image": 0, "mask": IGNORE_INDEX}
    return {
        key: stack_padded(values, padding[key]) if key in padding else torch.stack(values)
        for key, values in ((key, [item[key] for item in batch]) for key in batch[0])
    }
