"""The decision to use the unlabeled images: the teacher stage's evidence, read by the stages after it."""

import json
import math

import pytest

from segflow.config import parse_params
from segflow.errors import SegflowError
from segflow.training.semi_supervised import (
    architecture_params,
    labeled_only,
    unlabeled_images_won,
    uses_unlabeled_images,
    with_unlabeled,
)


def test_unlabeled_images_win_only_by_more_than_the_margin():
    assert unlabeled_images_won(0.50, 0.52, margin=0.01)
    assert not unlabeled_images_won(0.50, 0.505, margin=0.01)
    assert not unlabeled_images_won(0.50, 0.50, margin=0.0)  # a tie keeps the simpler model
    assert not unlabeled_images_won(0.50, 0.40, margin=0.0)
    assert not unlabeled_images_won(0.50, math.nan, margin=0.0)
    assert unlabeled_images_won(math.nan, 0.3, margin=0.0)


@pytest.mark.parametrize("decided", [True, False])
def test_auto_follows_the_teacher_stage_both_ways(tmp_path, decided):
    decision = tmp_path / "semi_supervised.json"
    decision.write_text(json.dumps({"use_unlabeled": decided, "reason": "..."}))
    assert uses_unlabeled_images("auto", decision) is decided
    assert uses_unlabeled_images(True, decision) is True  # an explicit setting wins
    assert uses_unlabeled_images(False, decision) is False


def test_auto_without_a_decision_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(SegflowError, match=r"semi_supervised.json: missing.*segflow teacher"):
        uses_unlabeled_images("auto", tmp_path / "semi_supervised.json")
    (tmp_path / "semi_supervised.json").write_text("{}")
    with pytest.raises(SegflowError, match="not a teacher-stage decision"):
        uses_unlabeled_images("auto", tmp_path / "semi_supervised.json")


def test_the_two_arms_differ_only_in_the_unlabeled_images():
    params = parse_params({"train": {"consistency": {"weight": 0.5, "threshold": 0.9}, "use_pseudo_labels": "auto"}})
    without = labeled_only(params.train)
    assert without.consistency.weight == 0 and without.use_pseudo_labels is False
    semi = with_unlabeled(params.train, 2.0)
    assert semi.consistency.weight == 2.0 and semi.consistency.threshold == 0.9
    assert semi.use_pseudo_labels is False  # the teacher makes the pseudo-labels, it does not use them
    assert params.train.consistency.weight == 0.5  # the original is untouched
    for arm in (without, semi):
        assert arm.model_dump(exclude={"consistency", "use_pseudo_labels"}) == \
            params.train.model_dump(exclude={"consistency", "use_pseudo_labels"})


@pytest.mark.parametrize("decided", [True, False])
def test_architectures_follow_the_decision_and_an_explicit_setting_keeps_its_consistency(tmp_path, decided):
    decision = tmp_path / "semi_supervised.json"
    decision.write_text(json.dumps({"use_unlabeled": decided}))
    consistency = {"weight": 0.5}
    auto, use = architecture_params(parse_params({"train": {"consistency": consistency}}).train, decision)
    assert use is decided and auto.consistency.weight == (0.5 if decided else 0.0)
    for setting in (True, False):
        params = parse_params({"train": {"use_pseudo_labels": setting, "consistency": consistency}})
        forced, use = architecture_params(params.train, decision)
        assert use is setting and forced.consistency.weight == 0.5
