"""One architecture of every family trains one epoch and evaluates through the pipeline's own stage functions.

The stage functions do not depend on the architecture beyond its family's module (options, card, aux head);
every single architecture's training step and outputs are checked in test_registry.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from zoo_testing import TINY

from segflow import models
from segflow.config import parse_params
from segflow.inference.predictor import load_model
from segflow.models.names import FAMILY_MODULES
from segflow.stages.evaluate import evaluate
from segflow.stages.ingest import ingest_coco
from segflow.stages.synth import generate
from train_testing import train_from_params

SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """The embedded default data (generated COCO polygons) at a tiny size, ingested, with a fixed split."""
    root = tmp_path_factory.mktemp("default-data")
    generate(root / "synthetic", seed=0, num_labeled=10, num_unlabeled=0, image_size=SIZE)
    ingest_coco(root / "synthetic/images", root / "synthetic/annotations.json", root / "ingested")
    ids = sorted(p.stem for p in (root / "ingested/masks").glob("*.png"))
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    (root / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, splits)))
    return root / "ingested", root / "splits.csv"


# The cheapest architecture of each family module (segflow.models.names).
REPRESENTATIVES = ["deconvnet", "deeplabv1_largefov", "deeplabv2", "dilatednet", "fcdensenet56", "fcn8s", "pspnet",
                   "segnet_basic", "unet", "unet_original"]


def test_every_registered_architecture_has_a_small_configuration_and_every_family_a_representative():
    assert sorted(TINY) == models.available()
    assert sorted(FAMILY_MODULES[name] for name in REPRESENTATIVES) == sorted(set(FAMILY_MODULES.values()))


@pytest.mark.parametrize("arch", REPRESENTATIVES)
def test_architecture_trains_one_epoch_and_evaluates(arch, dataset, tmp_path):
    data_dir, splits_csv = dataset
    params = parse_params({
        "train": {"archs": [arch], "epochs": 1, "batch_size": 3, "crop_size": SIZE, "device": "cpu", "decoded_cache": False},
        "evaluate": {"batch_size": 2, "num_overlays": 1},
        "models": {arch: TINY[arch]},
    })
    result = train_from_params(params, arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / "models" / arch)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])

    model, card = load_model(tmp_path / "models" / arch)
    assert card.arch == arch and card.options == TINY[arch]
    metrics = evaluate(params.evaluate, params.mlflow, arch, device=params.train.device,
                       model_dir=tmp_path / "models" / arch,
                       data_dir=data_dir, splits_csv=splits_csv,
                       metrics_file=tmp_path / "metrics.json", out_dir=tmp_path / "evaluation",
                       plots_dir=tmp_path / "plots")
    assert 0.0 <= metrics["test"]["pixel_accuracy"] <= 1.0
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads((tmp_path / "evaluation" / "scores.json").read_text())["arch"] == arch
    assert len(list((tmp_path / "evaluation" / "overlays").glob("01_*.png"))) == 1  # the worst test image
    assert (tmp_path / "plots" / "history" / f"{arch}.csv").read_text().startswith("epoch,train_loss,val_miou\n1,")
