"""The pseudo-label and consistency targets: class-balanced thresholds, the class prior undone."""

from __future__ import annotations

import pytest
import torch

from segflow.training.targets import HISTOGRAM_BINS, class_thresholds, corrected


def _histogram(confidences: list[float], count: int) -> torch.Tensor:
    histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.int64)
    for value in confidences:
        histogram[min(int(value * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += count
    return histogram


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


def test_prior_correction_recovers_the_posterior_that_class_weighting_inflated():
    posterior = torch.tensor([0.6, 0.3, 0.1]).view(1, 3, 1, 1)
    class_weight = torch.tensor([0.5, 1.0, 8.0])
    weighted = posterior * class_weight.view(1, 3, 1, 1)
    weighted = weighted / weighted.sum(dim=1, keepdim=True)  # what weighted cross-entropy learns
    assert weighted.argmax(dim=1).item() == 2
    assert torch.allclose(corrected(weighted, class_weight, 1.0), posterior)
    assert torch.equal(corrected(weighted, class_weight, 0.0), weighted)
    assert torch.equal(corrected(weighted, None, 1.0), weighted)
