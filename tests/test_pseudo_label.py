"""Pseudo-labels: class-balanced thresholds, ST++ reliability, strong augmentation of pseudo-labeled images,
the label-next ranking, and the teacher stage's semi-supervised comparison on the embedded default data at a
tiny size."""

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
from segflow.config import StrongAugmentParams, parse_params
from segflow.data.datasets import (
    Sample,
    SegmentationDataset,
    load_pseudo_samples,
    load_samples,
    pad_collate,
    strong_augment,
)
from segflow.data.imageio import read_mask
from segflow.inference.predictor import load_model, probabilities
from segflow.stages import teacher as teacher_stage
from segflow.stages.evaluate import evaluate
from segflow.stages.ingest import ingest_coco
from segflow.stages.pseudo_label import (
    choose_prior_correction,
    label_priority,
    prediction_agreement,
    pseudo_label,
)
from segflow.stages.synth import generate
from segflow.stages.teacher import train_teacher
from segflow.stages.train import mix_labeled_and_pseudo, train
from segflow.training.targets import HISTOGRAM_BINS, class_thresholds, corrected
from train_testing import train_from_params

SIZE = 48


def _histogram(confidences: list[float], count: int) -> torch.Tensor:
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64)
    for value in confidences:
        histogram[min(int(value * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += count
    return histogram


def _sections(params):
    """What choose_prior_correction reads: pseudo_label, train and evaluate.inference."""
    return params.pseudo_label, params.train, params.evaluate.inference


def test_class_balanced_thresholds_keep_a_rare_unsure_class_that_the_global_one_wipes_out():
    sure = _histogram([0.95, 0.99], 1000)          # a common class, confident
    unsure = _histogram([0.4, 0.5, 0.6, 0.8], 10)   # a rare class the teacher hesitates on
    histograms = torch.stack([sure, unsure, torch.zeros(HISTOGRAM_BINS, dtype=torch.int64)])

    global_only = class_thresholds(histograms, 0.9, None)
    assert global_only.tolist() == [0.9, 0.9, 0.9]

    balanced = class_thresholds(histograms, 0.9, 0.5)
    assert balanced[0] == pytest.approx(0.9)       # never raised above the global threshold
    assert balanced[1] == pytest.approx(0.6)       # the top half of the rare class's pixels pass
    assert balanced[2] == pytest.approx(0.9)       # a class never predicted keeps the global threshold


def test_prediction_agreement_is_the_mean_iou_of_two_label_maps():
    a = torch.tensor([[0, 0, 1, 1]])
    assert prediction_agreement(a, a, 3) == 1.0
    assert prediction_agreement(a, torch.tensor([[0, 0, 0, 1]]), 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert prediction_agreement(a, 1 - a, 3) == 0.0


def test_reliable_fraction_keeps_the_most_stable_images(tmp_path):
    frame = pd.DataFrame({"image_id": list("abcd"), "image_path": [f"{i}.png" for i in "abcd"],
                          "mask_path": [f"masks/{i}.png" for i in "abcd"], "reliability": [0.2, 0.9, 0.5, 0.7]})
    frame.to_csv(tmp_path / "pseudo_manifest.csv", index=False)
    assert [s.image_id for s in load_pseudo_samples(tmp_path, 0.5)] == ["b", "d"]
    assert [s.image_id for s in load_pseudo_samples(tmp_path)] == list("abcd")
    assert all(s.pseudo for s in load_pseudo_samples(tmp_path))


def test_the_smaller_set_is_repeated_until_pseudo_labels_are_their_share():
    labeled = [Sample(f"l{i}", Path("x"), Path("y")) for i in range(3)]
    pseudo = [Sample(f"p{i}", Path("x"), Path("y"), pseudo=True) for i in range(10)]
    assert len(mix_labeled_and_pseudo(labeled, pseudo, 0.5)) == 9 + 10      # few labeled images (ST++)
    many = [Sample(f"m{i}", Path("x"), Path("y")) for i in range(10)]
    assert len(mix_labeled_and_pseudo(many, pseudo[:2], 0.5)) == 10 + 2 * 5   # few unlabeled target frames
    assert len(mix_labeled_and_pseudo(labeled, pseudo, 0.75)) == 3 + 10   # already 10 / 13: once each
    assert len(mix_labeled_and_pseudo(labeled, pseudo, None)) == 3 + 10
    assert mix_labeled_and_pseudo(labeled, [], 0.5) == labeled


def test_cutout_blanks_a_box_whose_pixels_the_loss_ignores():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 50)
    mask = torch.randint(0, 4, (40, 50))
    only_cutout = StrongAugmentParams(color_jitter=0, grayscale=0, blur=0, cutout=1)
    out_image, out_mask = strong_augment(image, mask, only_cutout)
    box = out_mask == IGNORE_INDEX
    assert 0 < box.sum() < box.numel()
    assert torch.equal(out_mask[~box], mask[~box]) and torch.equal(out_image[:, ~box], image[:, ~box])
    assert not torch.equal(out_image[:, box], image[:, box])

    nothing = StrongAugmentParams(color_jitter=0, grayscale=0, blur=0, cutout=0)
    assert all(torch.equal(a, b) for a, b in zip(strong_augment(image, mask, nothing), (image, mask)))


def test_photometric_perturbations_change_the_image_but_never_the_mask():
    torch.manual_seed(1)
    image, mask = torch.rand(3, 32, 32), torch.randint(0, 4, (32, 32))
    photometric = StrongAugmentParams(color_jitter=1, grayscale=1, blur=1, cutout=0)
    out_image, out_mask = strong_augment(image, mask, photometric)
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_image, image) and out_image.min() >= 0 and out_image.max() <= 1


@pytest.fixture(scope="module")
def semi_supervised(tmp_path_factory) -> tuple[Path, Path]:
    """The embedded default data, tiny: 6 labeled training images, 10 whose masks are hidden, 6 without masks."""
    root = tmp_path_factory.mktemp("semi")
    generate(root / "synthetic", seed=0, num_labeled=28, num_unlabeled=6, image_size=SIZE)
    ingest_coco(root / "synthetic/images", root / "synthetic/annotations.json", root / "ingested",
                unlabeled=root / "synthetic/unlabeled")
    manifest = pd.read_csv(root / "ingested/manifest.csv", dtype=str, keep_default_na=False)
    labeled = manifest.loc[manifest["mask_path"] != "", "image_id"].tolist()
    splits = ["train"] * 6 + ["unlabeled"] * 10 + ["val"] * 6 + ["test"] * 6
    rows = dict(zip(labeled, splits)) | {i: "unlabeled" for i in manifest.loc[manifest["mask_path"] == "", "image_id"]}
    (root / "splits.csv").write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in rows.items()))
    return root / "ingested", root / "splits.csv"


def _params(**sections) -> object:
    base = {
        "train": {"archs": ["unet"], "epochs": 1, "batch_size": 4, "crop_size": SIZE, "device": "cpu", "decoded_cache": False},
        "teacher": {"arch": "unet", "epochs": 3, "snapshots": 1},
        "pseudo_label": {"threshold": 0.95, "class_balanced": True, "class_keep_fraction": 0.5,
                         "reliable_fraction": 0.5},
        "evaluate": {"batch_size": 4, "num_overlays": 0, "inference": {"flip": True}},
        "models": {"unet": {"encoder_name": "resnet18"}},
    }
    for section, values in sections.items():
        base[section] = base.get(section, {}) | values
    return parse_params(base)


def test_prior_correction_recovers_the_posterior_that_class_weighting_inflated():
    posterior = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1)
    class_weight = torch.tensor([0.5, 1.0, 8.0])
    weighted = posterior * class_weight.view(1, 3, 1, 1)
    weighted = weighted / weighted.sum(dim=1, keepdim=True)  # what weighted cross-entropy learns
    assert weighted.argmax(dim=1).item() == 2
    assert torch.allclose(corrected(weighted, class_weight, 1.0), posterior)
    assert torch.equal(corrected(weighted, class_weight, 0.0), weighted)
    assert torch.equal(corrected(weighted, None, 1.0), weighted)


class _ConstantLogits(torch.nn.Module):
    """A "teacher" that predicts the same class probabilities at every pixel."""

    def __init__(self, probabilities: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probabilities).log().view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(images.shape[0], -1, *images.shape[-2:])


def test_auto_prior_correction_picks_the_strength_with_the_best_val_miou(semi_supervised):
    data_dir, splits_csv = semi_supervised
    val = load_samples(data_dir, splits_csv, "val")
    # Background (class 0) covers most val pixels; the weighting inflated class 1 above it.
    teacher = _ConstantLogits([0.3, 0.6, 0.025, 0.025, 0.025, 0.025])
    class_weight = torch.tensor([1.0, 4.0, 1.0, 1.0, 1.0, 1.0])
    strength, val_miou = choose_prior_correction(*_sections(_params()), teacher, class_weight, val, torch.device("cpu"), 6)
    assert strength == 0.75  # the weakest correction that gives class 0 back: 0.6 / 4 ** 0.75 < 0.3
    assert val_miou["0.75"] == val_miou["1"] > val_miou["0"]
    fixed = _params(pseudo_label={"prior_correction": 0.25})
    assert choose_prior_correction(*_sections(fixed), teacher, class_weight, val, torch.device("cpu"), 6) == (0.25, {})
    assert choose_prior_correction(*_sections(_params()), teacher, None, val, torch.device("cpu"), 6) == (0.0, {})


def test_teacher_stage_trains_both_teachers_at_one_budget_and_keeps_the_one_val_picks(semi_supervised, tmp_path,
                                                                                     monkeypatch):
    data_dir, splits_csv = semi_supervised
    params = _params(train={"class_weighting": True, "ema": {"decay": 0.9}})
    started = []  # (run name, init_from, its weights when the training began)

    def recording_train(cfg, arch, **kwargs):
        init_from = kwargs.get("init_from")
        started.append((kwargs["run_name"], init_from, None if init_from is None else load_file(init_from / WEIGHTS_FILE)))
        return train(cfg, arch, **kwargs)

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
                             train_crop_size=params.train.crop_size, model_dir=tmp_path / arm, data_dir=data_dir,
                             splits_csv=splits_csv,
                             metrics_file=tmp_path / f"{arm}.json", out_dir=tmp_path / f"eval-{arm}",
                             plots_dir=tmp_path / "plots")
    assert all(math.isfinite(m["test"]["miou"]) for m in arms.values())
    assert arms["labeled-only"]["test"]["data_hash"] == arms["pseudo-labeled"]["test"]["data_hash"]


def test_label_priority_grows_with_doubt_instability_and_rare_classes():
    assert label_priority(1.0, 1.0, 0.0) == 0.0  # sure, stable, common classes: nothing to learn
    assert label_priority(0.0, 1.0, 1.0) == 1.0
    assert label_priority(0.5, 1.0, 0.0) < label_priority(0.4, 1.0, 0.0)
    assert label_priority(0.8, 1.0, 0.0) < label_priority(0.8, 0.5, 0.0)
    assert label_priority(0.8, 1.0, 0.0) < label_priority(0.8, 1.0, 0.5)


def test_label_next_ranks_the_images_the_teacher_gets_most_wrong_first(semi_supervised, tmp_path):
    """On the embedded default data, with the masks of the semi-supervised protocol hidden: the images ranked in
    the first half of label_next.csv hold more of the teacher's mistakes than the second half."""
    data_dir, splits_csv = semi_supervised
    # The teacher this test was built on: with train.prior_init its errors on these 10 images halve (0.14 against
    # 0.23) and are too even for a ranking of 10 to show (Spearman 0.16 against 0.38); an open point of issue 20.
    params = _params(train={"epochs": 40, "val_interval": 40, "prior_init": False})
    train_from_params(params, "unet", data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / "teacher")
    pseudo_label(params.pseudo_label, params.train, params.evaluate.inference, params.mlflow,
                 teacher_dir=tmp_path / "teacher", data_dir=data_dir, splits_csv=splits_csv,
                 out_dir=tmp_path / "pseudo", label_next_file=tmp_path / "label_next.csv")
    ranking = pd.read_csv(tmp_path / "label_next.csv")
    assert ranking["rank"].tolist() == list(range(1, 17))
    assert ranking["priority"].is_monotonic_decreasing
    hidden = ranking.dropna(subset=["teacher_error"])  # the 10 images whose masks are hidden
    assert len(hidden) == 10
    first, second = hidden.iloc[:5], hidden.iloc[5:]
    assert first["teacher_error"].mean() > second["teacher_error"].mean()
    assert hidden["priority"].corr(hidden["teacher_error"], method="spearman") > 0.3
