"""The evaluate stage on a tiny model: metrics file, DVC plot tables, and the dense CRF reported beside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segflow import models
from segflow.config import parse_params
from segflow.evaluate import evaluate
from segflow.imageio import write_image, write_mask
from segflow.inference import ModelCard, save_model

ARCH = "fcn32s"
OPTIONS = {"width": 0.0625}


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A random tiny model with a one-epoch history, and two labeled test images with their splits file."""
    torch.manual_seed(0)
    model = models.build(ARCH, num_classes=2, **OPTIONS)
    save_model(model, ModelCard(arch=ARCH, num_classes=2, classes=["background", "thing"], options=OPTIONS),
               tmp_path / "model")
    (tmp_path / "model" / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 0.7, "val_miou": 0.4}]))
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in ("a", "b"):
        mask = np.zeros((20, 28), np.uint8)
        mask[5:15, 8:20] = 1
        image = np.where(mask[..., None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 20, (20, 28, 3), np.uint8)
        write_image(data / f"{name}.png", image)
        write_mask(data / "masks" / f"{name}.png", mask)
        rows.append(f"{name},{name}.png,masks/{name}.png,28,20,\n")
    (data / "manifest.csv").write_text("image_id,image_path,mask_path,width,height,split\n" + "".join(rows))
    (data / "classes.json").write_text(json.dumps({"names": ["background", "thing"]}))
    (tmp_path / "splits.csv").write_text("image_id,split\na,test\nb,test\n")
    return tmp_path


def _evaluate(workspace: Path, evaluate_params: dict) -> dict:
    params = parse_params({"train": {"crop_size": 16, "device": "cpu"}, "evaluate": evaluate_params})
    return evaluate(params, ARCH, model_dir=workspace / "model", data_dir=workspace / "data",
                    splits_csv=workspace / "splits.csv", metrics_file=workspace / "metrics" / f"{ARCH}.json",
                    out_dir=workspace / "evaluation", plots_dir=workspace / "plots")


def test_evaluation_writes_metrics_and_the_dvc_plot_tables(workspace):
    metrics = _evaluate(workspace, {"num_overlays": 1})
    assert json.loads((workspace / "metrics" / f"{ARCH}.json").read_text()) == metrics
    assert "miou_crf" not in metrics
    assert (workspace / "plots/history" / f"{ARCH}.csv").read_text() == "epoch,train_loss,val_miou\n1,0.7,0.4\n"
    per_class = (workspace / "plots/per_class_iou" / f"{ARCH}.csv").read_text().splitlines()
    assert per_class[0] == "class,iou" and [line.split(",")[0] for line in per_class[1:]] == ["background", "thing"]


def test_crf_scores_are_reported_beside_the_network_scores(workspace):
    plain = _evaluate(workspace, {"crf": {"enabled": False}})
    with_crf = _evaluate(workspace, {"crf": {"enabled": True, "iterations": 3}})
    assert with_crf["miou"] == pytest.approx(plain["miou"])  # the headline score is the network's own
    assert 0 <= with_crf["miou_crf"] <= 1 and 0 <= with_crf["pixel_accuracy_crf"] <= 1
    # Without pairwise terms the CRF keeps every pixel's class: the same scores, through the CRF code path.
    neutral = _evaluate(workspace, {"crf": {"enabled": True, "bilateral_weight": 0, "gaussian_weight": 0}})
    assert neutral["miou_crf"] == pytest.approx(plain["miou"])
    assert neutral["pixel_accuracy_crf"] == pytest.approx(plain["pixel_accuracy"])
