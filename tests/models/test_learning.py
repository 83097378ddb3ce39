"""Every registered architecture learns with its own recipe: a small configuration of each, trained by the train
stage's function on the embedded default data for the default number of epochs, beats predicting the majority
class everywhere on val (a collapsed model, such as FCN-8s without normalisation was, does not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from zoo_testing import TINY

from segflow import models
from segflow.config import parse_params
from segflow.evaluate import majority_baseline
from segflow.imageio import read_mask
from segflow.ingest import ingest_coco
from segflow.synth import generate
from train_testing import train_from_params

SIZE = 48
SPLITS = ["train"] * 24 + ["val"] * 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, float]:
    """The embedded default data at a small size, ingested and split, and the majority class's val mIoU."""
    root = tmp_path_factory.mktemp("default-data")
    generate(root / "synthetic", seed=0, num_labeled=len(SPLITS), num_unlabeled=0, image_size=SIZE)
    ingest_coco(root / "synthetic/images", root / "synthetic/annotations.json", root / "ingested")
    ids = sorted(p.stem for p in (root / "ingested/masks").glob("*.png"))
    (root / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, SPLITS)))
    val = np.concatenate([read_mask(root / "ingested/masks" / f"{i}.png").ravel()
                          for i, s in zip(ids, SPLITS) if s == "val"])
    counts = np.bincount(val[val != 255])
    baseline = majority_baseline(np.diag(counts), [str(c) for c in range(len(counts))])["miou"]
    return root / "ingested", root / "splits.csv", baseline


@pytest.mark.parametrize("arch", models.available())
def test_architecture_beats_the_majority_class_with_its_recipe(arch, dataset, tmp_path):
    data_dir, splits_csv, majority = dataset
    params = parse_params({  # the default epochs and recipe; a batch size for 24 images
        "train": {"archs": [arch], "batch_size": 4, "crop_size": SIZE, "device": "cpu", "decoded_cache": False},
        "models": {arch: TINY[arch]},
    })
    result = train_from_params(params, arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / arch)
    assert result.best_miou > majority + 0.05, (arch, result.history, majority)
