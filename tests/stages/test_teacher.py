"""The teacher stage: both teachers at one budget, warm-started alike, the one val picks kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from segflow import IGNORE_INDEX, WEIGHTS_FILE
from segflow.data.datasets import (
    SegmentationDataset,
    load_samples,
    pad_collate,
)
from segflow.data.imageio import read_mask
from segflow.inference.predictor import load_model, probabilities
from segflow.stages import teacher as teacher_stage
from segflow.stages.evaluate import evaluate
from segflow.stages.pseudo_label import (
    pseudo_label,
)
from segflow.stages.teacher import train_teacher
from segflow.stages.train import train
from segflow.training.targets import corrected
from semi_testing import SIZE, make_semi_supervised
from semi_testing import semi_params as _params
from train_testing import train_from_params


@pytest.fixture(scope="module")
def semi_supervised(tmp_path_factory) -> tuple[Path, Path]:
    return make_semi_supervised(tmp_path_factory.mktemp("semi"))


def test_teacher_stage_trains_both_teachers_at_one_budget_and_keeps_the_one_val_picks(semi_supervised, tmp_path,
                                                                                     monkeypatch):
    data_dir, splits_csv = semi_supervised
    params = _params(train={"class_weighting": True, "ema": {"decay": 0.9}})
    started = []  # (run name, init_from, its weights when the training began)

    def recording_train(cfg, arch, run, **kwargs):
        started.append((run.name, run.init_from, None if run.init_from is None else load_file(run.init_from / WEIGHTS_FILE)))
        return train(cfg, arch, run, **kwargs)

    monkeypatch.setattr(teacher_stage, "train", recording_train)
    summary = train_teacher(params.teacher, params.train, model_options=params.models.get(params.teacher.arch, {}),
                            val_batch_size=params.evaluate.batch_size, inference=params.evaluate.inference,
                            mlflow_cfg=params.mlflow, data_dir=data_dir, splits_csv=splits_csv,
                            out_dir=tmp_path / "teacher", metrics_file=tmp_path / "semi_supervised.json")
    assert json.loads((tmp_path / "semi_supervised.json").read_text()) == summary
    labeled, semi = summary["labeled_only"], summary["with_unlabeled"]
    assert labeled["steps"] == semi["steps"] == 3 * (6 // 4)  # the same optimizer steps
    assert all(0 <= arm[key] <= 1 for arm in (labeled, semi) for key in ("val_miou", "test_miou"))
    assert summary["use_unlabeled"] == (semi["val_miou"] > labeled["val_miou"])
    assert summary["kept"] == ("with_unlabeled" if summary["use_unlabeled"] else "labeled_only")
    # teacher.warm_start: a labeled-only teacher first, then both arms from its very weights
    assert summary["warm_start"] and summary["start"]["steps"] == labeled["steps"]
    (start_name, start_init, _), *arms = started
    assert start_name == "teacher start" and start_init is None
    assert [name for name, _, _ in arms] == ["teacher labeled-only", "teacher with-unlabeled"]
    (_, first_init, first_weights), (_, second_init, second_weights) = arms
    assert first_init == second_init and first_init.name == "start"
    assert first_weights.keys() == second_weights.keys()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert load_model(tmp_path / "teacher")[1].extra["init_from"] == str(first_init)
    assert load_model(tmp_path / "teacher")[1].extra["val_miou"] == pytest.approx(summary[summary["kept"]]["val_miou"])
    assert len(list((tmp_path / "teacher" / "snapshots").glob("epoch_*"))) == 1

    # The architecture stage's pseudo-labels: the kept teacher labels every unlabeled image.
    summary = pseudo_label(params.pseudo_label, params.train, params.evaluate.inference, params.mlflow,
                           teacher_dir=tmp_path / "teacher", data_dir=data_dir, splits_csv=splits_csv,
                           out_dir=tmp_path / "pseudo", metrics_file=tmp_path / "pseudo_label.json",
                           label_next_file=tmp_path / "label_next.csv")
    unlabeled = load_samples(data_dir, splits_csv, "unlabeled")
    assert summary["images"] == len(unlabeled) == 16
    masks = {p.stem: read_mask(p) for p in (tmp_path / "pseudo/masks").glob("*.png")}
    assert len(masks) == 16 and all(m.shape == (SIZE, SIZE) for m in masks.values())
    assert 0 < summary["coverage"] < 1
    assert summary["hidden_mask_pixels"] == 10 * SIZE * SIZE  # only the hidden masks are scored
    assert set(summary["pseudo_class_accuracy"]) == set(summary["thresholds"])
    # The teacher's card carries its class weights; their bias is undone as much as val mIoU says.
    model, card = load_model(tmp_path / "teacher")
    assert len(card.extra["class_weight"]) == card.num_classes
    assert len(summary["prior_correction_val_miou"]) == 5
    assert summary["prior_correction_val_miou"][f"{summary['prior_correction']:g}"] == max(
        summary["prior_correction_val_miou"].values())
    manifest = pd.read_csv(tmp_path / "pseudo/pseudo_manifest.csv")
    assert manifest["reliability"].between(0, 1).all()

    # Class-balanced thresholds: every class the teacher predicts is still in the pseudo-labels.
    batch = pad_collate([SegmentationDataset(unlabeled)[i] for i in range(len(unlabeled))])
    teacher_probabilities = corrected(probabilities(model, batch["image"], params.evaluate.inference),
                                      torch.tensor(card.extra["class_weight"]), summary["prior_correction"])
    predicted = set(torch.unique(teacher_probabilities.argmax(dim=1)).tolist())
    kept = set(np.unique(np.concatenate([m.ravel() for m in masks.values()]))) - {IGNORE_INDEX}
    assert predicted <= kept

    # The student trains on labeled + pseudo-labeled images and is scored on the same test split as the
    # labeled-only arm (the comparison the CamVid benchmark makes at full size).
    arms = {}
    for arm, pseudo_dir in (("labeled-only", None), ("pseudo-labeled", tmp_path / "pseudo")):
        train_from_params(params, "unet", data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / arm, pseudo_dir=pseudo_dir)
        arms[arm] = evaluate(params.evaluate, params.mlflow, arm, device=params.train.device,
                             model_dir=tmp_path / arm, data_dir=data_dir,
                             splits_csv=splits_csv,
                             metrics_file=tmp_path / f"{arm}.json", out_dir=tmp_path / f"eval-{arm}",
                             plots_dir=tmp_path / "plots")
    assert all(math.isfinite(m["test"]["miou"]) for m in arms.values())
    assert arms["labeled-only"]["test"]["data_hash"] == arms["pseudo-labeled"]["test"]["data_hash"]
