"""A registrable workspace and the evaluate stage's scores file, written by hand for the register and registry tests
(the `workspace` fixture in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient

from segflow import models
from segflow.config import InferenceParams, Params, parse_params
from segflow.data.imageio import write_image, write_mask
from segflow.inference.card import ModelCard
from segflow.inference.predictor import save_model
from segflow.inference.scores import SCORES_FILE
from segflow.registry.promotion import TestSplit, promote_version
from segflow.stages.register import register


def write_scores(
    evaluation_dir: Path, name: str, *, arch: str, test: float, val: float | None = None, data_hash: str = "hash-1",
    predicted: tuple[str, ...] = ("background", "thing"), baseline: float = 0.0,
    inference: InferenceParams | None = None,
) -> None:
    """``evaluation_dir/NAME/scores.json`` with mIoU ``test`` (and ``val``, default the same) and the floor's
    inputs: the classes predicted on test and the majority-class baseline; ``inference``: the settings it was
    scored with (default: evaluate.inference's default, whole image)."""
    val = test if val is None else val
    folder = Path(evaluation_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCORES_FILE).write_text(json.dumps({
        "name": name, "arch": arch, "val": {"miou": val},
        "test": {"miou": test, "data_hash": data_hash, "predicted_classes": list(predicted)},
        "majority_baseline": {"class": "background", "miou": baseline},
        "inference": (inference or InferenceParams()).model_dump(mode="json"),
    }))


ARCH = "fcn32s"


def make_workspace(tmp_path: Path) -> Path:
    """A trained-looking model folder, one tiny labeled test image, and its splits file."""
    torch.manual_seed(0)
    model = models.build(ARCH, num_classes=2, width=0.0625)
    save_model(model, ModelCard(arch=ARCH, num_classes=2, classes=["background", "thing"], options={"width": 0.0625},
                                crop_size=24), tmp_path / "models" / ARCH)
    (tmp_path / "models" / ARCH / "history.json").write_text("[]")
    data = tmp_path / "data"
    (data / "masks").mkdir(parents=True)
    write_image(data / "a.png", np.full((16, 16, 3), 100, np.uint8))
    write_mask(data / "masks" / "a.png", np.eye(16, dtype=np.uint8))
    (data / "manifest.csv").write_text("image_id,image_path,mask_path,width,height,split\na,a.png,masks/a.png,16,16,\n")
    (data / "classes.json").write_text(json.dumps({"names": ["background", "thing"]}))
    (tmp_path / "splits.csv").write_text("image_id,split\na,test\n")
    return tmp_path


def register_version(workspace: Path, name: str, miou: float, data_hash: str = "hash-1"):
    """Run the register stage on the workspace's model with a made-up test (and val) score."""
    write_scores(workspace / "evaluation", ARCH, arch=ARCH, test=miou, data_hash=data_hash)
    params = parse_params({"train": {"archs": [ARCH]}, "register": {"model_name": name, "margin": 0.01}})
    return register_stage(params, candidates=[ARCH], evaluation_dir=workspace / "evaluation",
                          models_dir=workspace / "models", data_dir=workspace / "data",
                          splits_csv=workspace / "splits.csv", out_file=workspace / "decision.json")


def test_split(params: Params, data_dir: Path, splits_csv: Path) -> TestSplit:
    """The test split as `segflow register` and `segflow promote` build it from params.yaml."""
    return TestSplit(data_dir, splits_csv, params.evaluate.batch_size, params.evaluate.inference)


def register_stage(params: Params, *, data_dir: Path, splits_csv: Path, **dirs_and_force):
    """segflow.stages.register.register with its params sections taken from ``params``, as the CLI passes them."""
    return register(params.register_, params.mlflow, test_split(params, data_dir, splits_csv), **dirs_and_force)


def promote(params: Params, name: str, version: str, *, data_dir: Path, splits_csv: Path, **force_and_reason):
    """segflow.registry.promotion.promote_version with its params sections taken from ``params``, as the CLI passes them."""
    return promote_version(name, version, register=params.register_, mlflow_cfg=params.mlflow,
                           test=test_split(params, data_dir, splits_csv), **force_and_reason)


def artifact_dir(name: str, version: str = "1") -> Path:
    """The version's model folder in the (local) artifact store, as an attacker with write access sees it."""
    return Path(MlflowClient().get_model_version_download_uri(name, version).removeprefix("file://"))
