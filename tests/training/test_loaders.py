"""The training set of one training: labeled and pseudo-labeled images mixed."""

from __future__ import annotations

from pathlib import Path

from segflow.data.datasets import (
    Sample,
)
from segflow.training.loaders import mix_labeled_and_pseudo


def test_the_smaller_set_is_repeated_until_pseudo_labels_are_their_share():
    labeled = [Sample(f"l{i}", Path("x"), Path("y")) for i in range(3)]
    pseudo = [Sample(f"p{i}", Path("x"), Path("y"), pseudo=True) for i in range(10)]
    assert len(mix_labeled_and_pseudo(labeled, pseudo, 0.5)) == 9 + 10      # few labeled images (ST++)
    many = [Sample(f"m{i}", Path("x"), Path("y")) for i in range(10)]
    assert len(mix_labeled_and_pseudo(many, pseudo[:2], 0.5)) == 10 + 2 * 5   # few unlabeled target frames
    assert len(mix_labeled_and_pseudo(labeled, pseudo, 0.75)) == 3 + 10   # already 10 / 13: once each
    assert len(mix_labeled_and_pseudo(labeled, pseudo, None)) == 3 + 10
    assert mix_labeled_and_pseudo(labeled, [], 0.5) == labeled
