"""The evaluate stage on a tiny model: metrics file, DVC plot tables, and the dense CRF reported beside."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from segflow import CARD_FILE, models
from segflow.config import parse_params
from segflow.data.imageio import write_image, write_mask
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json
from segflow.inference.card import ModelCard
from segflow.inference.predictor import save_model
from segflow.stages.evaluate import evaluate

ARCH = "fcn32s"
OPTIONS = {"width": 0.0625}
CARD = ModelCard(arch=ARCH, num_classes=2, classes=["background", "thing"], options=OPTIONS, crop_size=16)


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A random tiny model with a one-epoch history, two labeled test images and one val image, and the splits."""
    torch.manual_seed(0)
    model = models.build(ARCH, num_classes=2, **OPTIONS)
    save_model(model, CARD, tmp_path / "model")
    (tmp_path / "model" / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 0.7, "val_miou": 0.4}]))
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in ("a", "b", "c"):
        mask = np.zeros((20, 28), np.uint8)
        mask[5:15, 8:20] = 1
        image = np.where(mask[..., None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 20, (20, 28, 3), np.uint8)
        write_image(data / f"{name}.png", image)
        write_mask(data / "masks" / f"{name}.png", mask)
        rows.append(f"{name},{name}.png,masks/{name}.png,28,20,\n")
    (data / "manifest.csv").write_text("image_id,image_path,mask_path,width,height,split\n" + "".join(rows))
    (data / "classes.json").write_text(json.dumps({"names": ["background", "thing"]}))
    (tmp_path / "splits.csv").write_text("image_id,split\na,test\nb,test\nc,val\n")
    return tmp_path


def _constant_model(index: int) -> torch.nn.Module:
    """The tiny FCN predicting class ``index`` everywhere: a collapsed model."""
    model = models.build(ARCH, num_classes=2, **OPTIONS)
    with torch.no_grad():
        model.score_fr.weight.zero_()
        model.score_fr.bias.copy_(torch.tensor([-10.0, -10.0]).index_fill_(0, torch.tensor(index), 10.0))
    return model


def _evaluate(workspace: Path, evaluate_params: dict) -> dict:
    params = parse_params({"train": {"device": "cpu"}, "evaluate": evaluate_params})
    return evaluate(params.evaluate, params.mlflow, ARCH, device=params.train.device, model_dir=workspace / "model",
                    data_dir=workspace / "data", splits_csv=workspace / "splits.csv",
                    metrics_file=workspace / "metrics" / f"{ARCH}.json",
                    out_dir=workspace / "evaluation", plots_dir=workspace / "plots")


def test_evaluation_writes_scores_the_headline_metrics_and_the_dvc_plot_tables(workspace):
    scores = _evaluate(workspace, {"num_overlays": 1})
    assert json.loads((workspace / "evaluation" / "scores.json").read_text()) == scores
    assert json.loads((workspace / "metrics" / f"{ARCH}.json").read_text()) == {
        "val_miou": scores["val"]["miou"], "test_miou": scores["test"]["miou"],
        "test_pixel_accuracy": scores["test"]["pixel_accuracy"],
        "test_mean_class_accuracy": scores["test"]["mean_class_accuracy"]}  # what `dvc metrics show` prints
    assert (scores["val"]["images"], scores["test"]["images"]) == (1, 2) and "test_crf" not in scores
    assert (workspace / "plots/history" / f"{ARCH}.csv").read_text() == "epoch,train_loss,val_miou\n1,0.7,0.4\n"
    per_class = (workspace / "plots/per_class_iou" / f"{ARCH}.csv").read_text().splitlines()
    assert per_class[0] == "class,iou" and [line.split(",")[0] for line in per_class[1:]] == ["background", "thing"]


def test_the_sliding_window_is_the_training_crop_the_card_records(workspace):
    scores = _evaluate(workspace, {"inference": {"mode": "slide"}, "num_overlays": 0})
    assert (scores["inference"]["crop_size"], scores["inference"]["stride"]) == (16, 10)  # what register serves
    assert scores["gflops"] > 0  # at the training crop
    save_model(_constant_model(0), replace(CARD, crop_size=None), workspace / "model")  # an older card
    with pytest.raises(SegflowError, match=f"{workspace / 'model' / CARD_FILE}: .*no window size"):
        _evaluate(workspace, {"inference": {"mode": "slide"}})
    assert _evaluate(workspace, {"num_overlays": 0})["gflops"] is None


def test_the_majority_baseline_and_the_classes_predicted_are_what_a_collapsed_model_shows(workspace):
    save_model(_constant_model(0), CARD, workspace / "model")
    scores = _evaluate(workspace, {"num_overlays": 0})
    background = 1 - 120 / 560  # the "thing" box is 10x12 of 20x28 pixels in every image
    assert scores["majority_baseline"] == pytest.approx({
        "class": "background", "miou": background / 2, "pixel_accuracy": background,
        "mean_class_accuracy": 0.5, "mean_dice": (2 * background / (1 + background)) / 2})
    assert scores["test"]["predicted_classes"] == ["background"]
    assert scores["test"]["miou"] == pytest.approx(scores["majority_baseline"]["miou"])


def test_crf_scores_are_reported_beside_the_network_scores(workspace):
    plain = _evaluate(workspace, {"crf": {"enabled": False}})
    with_crf = _evaluate(workspace, {"crf": {"enabled": True, "iterations": 3}})
    assert with_crf["test"]["miou"] == pytest.approx(plain["test"]["miou"])  # the headline is the network's own
    assert 0 <= with_crf["test_crf"]["miou"] <= 1 and 0 <= with_crf["test_crf"]["pixel_accuracy"] <= 1
    # Without pairwise terms the CRF keeps every pixel's class: the same scores, through the CRF code path.
    neutral = _evaluate(workspace, {"crf": {"enabled": True, "bilateral_weight": 0, "gaussian_weight": 0}})
    assert neutral["test_crf"]["miou"] == pytest.approx(plain["test"]["miou"])
    assert neutral["test_crf"]["pixel_accuracy"] == pytest.approx(plain["test"]["pixel_accuracy"])


def test_a_test_split_without_labeled_pixels_is_refused_before_anything_is_written(workspace):
    for name in ("a", "b", "c"):
        write_mask(workspace / "data" / "masks" / f"{name}.png", np.full((20, 28), 255, np.uint8))
    with pytest.raises(SegflowError, match="split has no labeled pixels .* its mIoU is undefined"):
        _evaluate(workspace, {})
    assert not any((workspace / folder).exists() for folder in ("metrics", "evaluation", "plots"))


def test_a_class_absent_from_the_test_split_is_null_in_standard_json(workspace):
    for name in ("a", "b"):
        write_mask(workspace / "data" / "masks" / f"{name}.png", np.zeros((20, 28), np.uint8))  # no "thing"
    scores = _evaluate(workspace, {"num_overlays": 0})
    text = (workspace / "evaluation" / "scores.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the scores file"))
    assert strict == scores and math.isfinite(scores["test"]["miou"])
    assert scores["test"]["per_class_accuracy"]["thing"] is None  # no true "thing" pixel: undefined, not NaN


def test_the_json_writer_refuses_nan_and_infinity_naming_the_key(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"miou": 0.5})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"metrics\.json: not written: per_class_iou\.car is NaN or infinite"):
            atomic_write_json(path, {"miou": 0.5, "per_class_iou": {"road": 0.7, "car": bad}})
    assert json.loads(path.read_text()) == {"miou": 0.5}  # the previous file is left whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_overlays_show_the_worst_test_images_by_their_own_iou_and_every_picture_is_logged(workspace):
    save_model(_constant_model(1), CARD, workspace / "model")  # "thing" everywhere
    thing_share = {"good": 1.0, "mid": 0.5, "bad": 0.0, "mostly": 0.75}  # IoU 1, 0.25, 0, 0.375
    data, rows = workspace / "data", []
    for name in [*thing_share, "unlabeled"]:
        mask = np.zeros((20, 28), np.uint8)
        mask[:, : round(28 * thing_share.get(name, 0))] = 1
        if name == "unlabeled":
            mask[:] = 255  # no IoU: never shown as a failure
        write_image(data / f"{name}.png", np.zeros((20, 28, 3), np.uint8))
        write_mask(data / "masks" / f"{name}.png", mask)
        rows.append(f"{name},{name}.png,masks/{name}.png,28,20,\n")
    with open(data / "manifest.csv", "a") as manifest:
        manifest.writelines(rows)
    (workspace / "splits.csv").write_text("image_id,split\nc,val\n" + "".join(
        f"{name},test\n" for name in ("good", "unlabeled", "mid", "bad", "mostly")))

    _evaluate(workspace, {"num_overlays": 4, "batch_size": 2})
    overlays = ["01_bad.png", "02_mid.png", "03_mostly.png", "04_good.png"]
    assert sorted(p.name for p in (workspace / "evaluation" / "overlays").iterdir()) == overlays
    run = mlflow.last_active_run()
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ("learning_curves.png", "per_class_iou.png", "confusion_matrix.png",
                                              "overlays")} <= logged
    logged_overlays = MlflowClient().list_artifacts(run.info.run_id, "evaluation/overlays")
    assert [Path(a.path).name for a in logged_overlays] == overlays
