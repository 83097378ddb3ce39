"""Pseudo-labels: class-balanced thresholds, ST++ reliability, strong augmentation of pseudo-labeled images,
the label-next ranking, and the teacher stage's semi-supervised comparison on the embedded default data at a
tiny size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segflow import IGNORE_INDEX
from segflow.data.datasets import (
    SegmentationDataset,
    load_pseudo_samples,
    load_samples,
)
from segflow.data.imageio import read_mask
from segflow.inference.card import ModelCard
from segflow.inference.predictor import probabilities
from segflow.stages.pseudo_label import (
    Teacher,
    choose_prior_correction,
    label_priority,
    load_teacher,
    prediction_agreement,
    pseudo_label,
)
from segflow.training.targets import corrected
from semi_testing import make_semi_supervised
from semi_testing import semi_params as _params
from train_testing import train_from_params


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








@pytest.fixture(scope="module")
def semi_supervised(tmp_path_factory) -> tuple[Path, Path]:
    return make_semi_supervised(tmp_path_factory.mktemp("semi"))




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
    params = _params()
    card = ModelCard(arch="constant", num_classes=6, classes=[str(c) for c in range(6)])
    teacher = Teacher(_ConstantLogits([0.3, 0.6, 0.025, 0.025, 0.025, 0.025]), card, params.evaluate.inference,
                      torch.tensor([1.0, 4.0, 1.0, 1.0, 1.0, 1.0]), torch.device("cpu"))
    strength, val_miou = choose_prior_correction(params.pseudo_label, teacher, val, params.train.num_workers)
    assert strength == 0.75  # the weakest correction that gives class 0 back: 0.6 / 4 ** 0.75 < 0.3
    assert val_miou["0.75"] == val_miou["1"] > val_miou["0"]
    fixed = _params(pseudo_label={"prior_correction": 0.25}).pseudo_label
    workers = params.train.num_workers
    assert choose_prior_correction(fixed, teacher, val, workers) == (0.25, {})
    assert choose_prior_correction(params.pseudo_label, replace(teacher, class_weight=None), val, workers) == (0.0, {})




def test_the_masks_are_the_corrected_argmax_where_confident_and_ignore_elsewhere(semi_supervised, tmp_path):
    """Pixel by pixel, away from near-ties and near-threshold confidences (the stage keeps float16): a mask holds
    the argmax of the prior-corrected probabilities where their maximum clears the threshold, ignore elsewhere."""
    data_dir, splits_csv = semi_supervised
    params = _params(train={"epochs": 3, "class_weighting": True},
                     pseudo_label={"threshold": 0.6, "class_balanced": False, "prior_correction": 0.5})
    train_from_params(params, "unet", data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / "teacher")
    pseudo_label(params.pseudo_label, params.train, params.evaluate.inference, params.mlflow,
                 teacher_dir=tmp_path / "teacher", data_dir=data_dir, splits_csv=splits_csv, out_dir=tmp_path / "pseudo")
    teacher = load_teacher(tmp_path / "teacher", params.evaluate.inference, torch.device("cpu"))
    assert teacher.class_weight is not None and not torch.allclose(teacher.class_weight, teacher.class_weight[0])
    compared = kept = moved_by_correction = 0
    for sample in load_samples(data_dir, splits_csv, "unlabeled"):
        image = SegmentationDataset([sample])[0]["image"].unsqueeze(0)
        with torch.no_grad():
            probs = probabilities(teacher.model, image, teacher.inference)
        top2, labels = corrected(probs, teacher.class_weight, 0.5).topk(2, dim=1)
        confidence, second, labels = top2[0, 0].numpy(), top2[0, 1].numpy(), labels[0, 0].numpy()
        clear = (np.abs(confidence - 0.6) > 2e-3) & (confidence - second > 2e-3)
        expected = np.where(confidence >= 0.6, labels, IGNORE_INDEX)
        written = read_mask(tmp_path / "pseudo/masks" / f"{sample.image_id}.png")
        assert np.array_equal(written[clear], expected[clear]), sample.image_id
        compared += int(clear.sum())
        kept += int((clear & (confidence >= 0.6)).sum())
        moved_by_correction += int((clear & (probs[0].argmax(dim=0).numpy() != labels)).sum())
    # Both sides of the threshold are compared, and the correction changed labels the comparison covers.
    assert 0.05 < kept / compared < 0.95 and moved_by_correction > 0


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
