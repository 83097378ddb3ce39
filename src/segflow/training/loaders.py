"""The samples and loaders of one training: labeled, pseudo-labeled and unlabeled images, split across processes."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from segflow.config import TrainParams
from segflow.data.datasets import (
    Sample,
    SegmentationDataset,
    load_pseudo_samples,
    load_samples,
    pad_collate,
)
from segflow.data.decoded_cache import open_cache
from segflow.data.manifest import read_manifest
from segflow.errors import SegflowError
from segflow.training.consistency import (
    UnlabeledViews,
)
from segflow.training.distributed import EpochSampler, ProcessGroup, SeededDataset

log = logging.getLogger(__name__)


def mix_labeled_and_pseudo(labeled: list[Sample], pseudo: list[Sample], pseudo_share: float | None) -> list[Sample]:
    """The student's training set: the smaller of the two sets repeated (a whole number of times, at least once)
    until pseudo-labeled images are about ``pseudo_share`` of it, so neither the few true labels (ST++) nor a few
    unlabeled frames of the deployment domain are drowned out; None: every image once."""
    if pseudo_share is None or not labeled or not pseudo:
        return labeled + pseudo
    wanted = pseudo_share / (1 - pseudo_share)  # pseudo-labeled samples per labeled one
    if len(pseudo) < wanted * len(labeled):
        return labeled + pseudo * max(1, round(wanted * len(labeled) / len(pseudo)))
    return labeled * max(1, round(len(pseudo) / (wanted * len(labeled)))) + pseudo




@dataclass
class TrainingData:
    labeled_samples: list[Sample]
    pseudo_count: int
    train_count: int        # labeled + pseudo-labeled, the smaller set repeated (train.pseudo_share)
    val_count: int
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader  # this rank's share of the val images
    unlabeled_count: int = 0
    unlabeled_loader: DataLoader | None = None  # with train.consistency: weak and strong views (segflow.training.consistency)


def training_data(
    cfg: TrainParams, group: ProcessGroup, *, data_dir: Path, splits_csv: Path, pseudo_dir: Path | None,
    reliable_fraction: float, val_batch_size: int, cache_dir: Path, batch_augment: bool,
) -> TrainingData:
    """The samples and the loaders of one training: labeled + pseudo-labeled images (the ``reliable_fraction``
    of them) in a per-epoch seeded order split across ranks (segflow.training.distributed), val images split across
    ranks, and with ``train.consistency`` the unlabeled images' views, in their own seeded order."""
    labeled_samples = load_samples(data_dir, splits_csv, "train")
    pseudo_samples = []
    if pseudo_dir is not None:  # the caller decided (train.use_pseudo_labels, segflow.training.semi_supervised)
        pseudo_samples = load_pseudo_samples(pseudo_dir, reliable_fraction)
    train_samples = mix_labeled_and_pseudo(labeled_samples, pseudo_samples, cfg.pseudo_share)
    val_samples = load_samples(data_dir, splits_csv, "val")
    if not labeled_samples or not val_samples:
        raise SegflowError(f"{splits_csv}: the train and val splits must both hold labeled images.")
    check_crop_size(cfg, data_dir, labeled_samples)

    cache = open_cache(cache_dir, data_dir) if cfg.decoded_cache else None
    sampler = EpochSampler(len(train_samples), seed=cfg.seed, rank=group.rank, world_size=group.world_size)
    train_loader = DataLoader(
        SeededDataset(SegmentationDataset(train_samples, crop_size=cfg.crop_size, augment=cfg.augment,
                                          strong_augment=cfg.pseudo_augment, cache=cache, batch_augment=batch_augment)),
        batch_size=cfg.batch_size, sampler=sampler, drop_last=sampler.per_rank > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=group.device.type == "cuda", collate_fn=pad_collate,
        # Worker base seeds come from here, not from the global RNG the checkpoint restores (and SeededDataset
        # makes them irrelevant to the data anyway).
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0,
    )
    val_loader = DataLoader(
        SegmentationDataset(val_samples[group.rank :: group.world_size], cache=cache),
        batch_size=val_batch_size,
        num_workers=cfg.num_workers, collate_fn=pad_collate,
    )
    data = TrainingData(labeled_samples, len(pseudo_samples), len(train_samples), len(val_samples), sampler,
                        train_loader, val_loader)
    if cfg.consistency.weight > 0:
        unlabeled_samples = load_samples(data_dir, splits_csv, "unlabeled")
        if not unlabeled_samples:
            log.warning("train.consistency.weight is %g but %s holds no unlabeled images: labeled images only.",
                        cfg.consistency.weight, splits_csv)
            return data
        # Its own seed: the labeled image at the same position must not share the unlabeled one's draws.
        unlabeled_sampler = EpochSampler(len(unlabeled_samples), seed=cfg.seed + 1, rank=group.rank,
                                         world_size=group.world_size)
        data.unlabeled_count = len(unlabeled_samples)
        data.unlabeled_loader = DataLoader(
            SeededDataset(UnlabeledViews(unlabeled_samples, crop_size=cfg.crop_size, augment=cfg.augment,
                                         strong=cfg.pseudo_augment, cutmix=cfg.consistency.cutmix, cache=cache)),
            batch_size=cfg.batch_size, sampler=unlabeled_sampler,
            drop_last=unlabeled_sampler.per_rank >= cfg.batch_size, num_workers=cfg.num_workers,
            pin_memory=group.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + 1),
            persistent_workers=cfg.num_workers > 0,
        )
    return data


def check_crop_size(cfg: TrainParams, data_dir: Path, samples: list[Sample]) -> None:
    """A crop larger than every (scaled) training image is only padding: memory for nothing (4096 px crops of
    small images got the process killed by the kernel)."""
    sizes = read_manifest(data_dir).set_index("image_id").loc[[s.image_id for s in samples], ["width", "height"]]
    largest = math.ceil(int(sizes.astype(int).to_numpy().max()) * cfg.augment.scale_max)
    if cfg.crop_size > largest:
        raise SegflowError(
            f"train.crop_size {cfg.crop_size} is larger than every training image, even scaled by "
            f"train.augment.scale_max ({largest} px at most): the crops would hold only padding beyond that. "
            f"Set train.crop_size to at most {largest}.")
