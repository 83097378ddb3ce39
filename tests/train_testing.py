"""Shared helpers for the training tests: a tiny project folder (ingested data, splits, params.yaml) and its
model weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from segflow.config import Layout, parse_params
from segflow.data.imageio import read_mask
from segflow.stages.evaluate import majority_baseline
from segflow.stages.ingest import ingest_coco
from segflow.stages.synth import generate

SIZE = 32
# U-Net without batch norm or dropout: one batch of 8 and two of 4 give the same gradient up to float order.
PLAIN_UNET = {"width": 0.125, "batch_norm": False, "dropout": 0.0}
# No random draws in the data: scale 1, no flip, crop = image size.
NO_AUGMENT = {"hflip": False, "scale_min": 1.0, "scale_max": 1.0}


def make_project(root: Path, train: int, val: int = 2, size: int = SIZE) -> Path:
    """``root`` laid out as the CLI expects (data/ingested, data/splits.csv) with generated images."""
    generate(root / "synthetic", seed=0, num_labeled=train + val, num_unlabeled=0, image_size=size)
    ingest_coco(root / "synthetic/images", root / "synthetic/annotations.json", root / Layout.ingested)
    ids = sorted(p.stem for p in (root / Layout.ingested / "masks").glob("*.png"))
    splits = ["train"] * train + ["val"] * val
    (root / Layout.splits).write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, splits)))
    return root


def majority_val_miou(project: Path) -> float:
    """The val mIoU of predicting the val masks' most common class everywhere."""
    rows = [line.split(",") for line in (project / Layout.splits).read_text().split()[1:]]
    val = np.concatenate([read_mask(project / Layout.ingested / "masks" / f"{i}.png").ravel()
                          for i, split in rows if split == "val"])
    counts = np.bincount(val[val != 255])
    return majority_baseline(np.diag(counts), [str(c) for c in range(len(counts))])["miou"]


def write_params(root: Path, raw: dict[str, Any]) -> None:
    parse_params(raw)  # fail here, not in a subprocess
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def segflow_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from segflow.cli import main; main()", *args]


def subprocess_env() -> dict[str, str]:
    """The session's MLflow store, few threads (two cores are shared), no progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def train_from_params(params, arch: str, **kwargs):
    """segflow.stages.train.train with the params sections `segflow train --arch` passes it; ``kwargs`` are the
    fields of its TrainRun."""
    from segflow.stages.train import TrainRun, train

    return train(params.train, arch, TrainRun(**kwargs), model_options=params.models.get(arch, {}),
                 mlflow_cfg=params.mlflow, val_batch_size=params.evaluate.batch_size,
                 reliable_fraction=params.pseudo_label.reliable_fraction)
