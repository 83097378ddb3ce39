"""Choosing among candidates: ranked on val, refused without a finite score, held to the floor."""

import math

import pytest

from segflow.config import RegisterParams
from segflow.errors import SegflowError
from segflow.inference.scores import floor_failures, rank_candidates


def _scores(val: float | None, test: float = 0.5) -> dict:
    return {"val": {"miou": val}, "test": {"miou": test, "predicted_classes": ["road", "car"]},
            "majority_baseline": {"class": "road", "miou": 0.2}}


def test_candidates_rank_on_val_not_test_and_ties_keep_the_given_order():
    ranked = rank_candidates({"unet": _scores(0.4, test=0.9), "pspnet": _scores(0.6, test=0.1),
                              "teacher": _scores(0.6, test=0.2)}, "miou")
    assert ranked == [("pspnet", 0.6), ("teacher", 0.6), ("unet", 0.4)]


@pytest.mark.parametrize("missing", [None, math.nan, -math.inf])
def test_ranking_refuses_an_evaluation_without_a_finite_val_score(missing):
    with pytest.raises(SegflowError, match="the evaluation of pspnet has no val miou"):
        rank_candidates({"unet": _scores(0.4), "pspnet": _scores(missing)}, "miou")


def test_the_floor_names_every_reason():
    assert floor_failures(_scores(0.5, test=0.5), RegisterParams()) == []
    collapsed = {**_scores(0.2, test=0.2), "test": {"miou": 0.2, "predicted_classes": ["road"]}}
    reasons = floor_failures(collapsed, RegisterParams(min_score=0.3))
    assert reasons == ["it predicts only road on the test images",
                       "test miou 0.2000 does not beat predicting 'road' everywhere (0.2000) by more than "
                       "register.baseline_margin 0.05",
                       "test miou 0.2000 is below register.min_score 0.3"]
    assert floor_failures(collapsed, RegisterParams(floor=False)) == []  # smoke runs on toy budgets


def test_the_floor_wants_more_than_the_margin_over_the_baseline():
    cfg = RegisterParams(baseline_margin=0.25, min_score=0.0)  # 0.25 + 0.25 is exactly 0.5

    def at(score: float) -> dict:
        return {**_scores(0.5, test=score), "majority_baseline": {"class": "road", "miou": 0.25}}

    (reason,) = floor_failures(at(0.5), cfg)  # equal: not more than the margin
    assert reason.startswith("test miou 0.5000 does not beat predicting 'road' everywhere (0.2500)")
    assert floor_failures(at(math.nextafter(0.5, 1)), cfg) == []
    assert floor_failures(at(math.nextafter(0.5, 0)), cfg) != []
