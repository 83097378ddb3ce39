"""From a teacher's probabilities to training targets: the class prior undone, and per-class thresholds.

Shared by the offline pseudo-labels (``pseudo_label`` stage) and the online consistency targets
(``segflow.training.consistency``), so both trust the same corrected probabilities with the same thresholds.
"""

from __future__ import annotations

import torch

HISTOGRAM_BINS = 1000


def corrected(probabilities: torch.Tensor, class_weight: torch.Tensor | None, strength: float) -> torch.Tensor:
    """N×K×H×W probabilities divided by ``class_weight ** strength`` and renormalised: weighted cross-entropy
    learns probabilities proportional to weight × posterior, a prior shift that can be undone (as in logit
    adjustment, Menon et al. 2021), so the targets stop over-predicting the rare, up-weighted classes."""
    if class_weight is None or strength == 0:
        return probabilities
    adjusted = probabilities / class_weight.view(1, -1, 1, 1) ** strength
    return adjusted / adjusted.sum(dim=1, keepdim=True)


def confidence_histograms(labels: torch.Tensor, confidence: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×BINS counts of the pixels given to each class, by confidence (``labels`` and ``confidence`` alike in shape)."""
    bins = (confidence * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
    flat = (labels.long() * HISTOGRAM_BINS + bins).flatten()
    return torch.bincount(flat, minlength=num_classes * HISTOGRAM_BINS).view(num_classes, HISTOGRAM_BINS)


def class_thresholds(histograms: torch.Tensor, threshold: float, keep_fraction: float | None) -> torch.Tensor:
    """One threshold per class from K×BINS confidence histograms of the pixels the teacher gives each class.

    ``keep_fraction`` None: ``threshold`` for every class. Otherwise class-balanced (CBST, Zou et al. 2018): a
    class's threshold is lowered, never raised, until at least ``keep_fraction`` of its pixels pass, so a rare
    class the teacher is less sure of keeps pixels instead of vanishing from the targets.
    """
    num_classes = histograms.shape[0]
    thresholds = torch.full((num_classes,), threshold, dtype=torch.float64, device=histograms.device)
    if keep_fraction is None:
        return thresholds
    # share of the class's pixels with confidence >= each bin's lower edge
    tail = histograms.double().flip(-1).cumsum(-1).flip(-1)
    share = tail / tail[:, :1].clamp_min(1)
    lower_edges = torch.arange(HISTOGRAM_BINS, dtype=torch.float64, device=histograms.device) / HISTOGRAM_BINS
    # the highest bin edge that still keeps keep_fraction (share falls as the edge rises); none: keep the global one
    passing = share >= keep_fraction
    highest = torch.where(passing, lower_edges, torch.full_like(lower_edges, -1.0)).max(dim=1).values
    return torch.where(highest >= 0, torch.minimum(highest, thresholds), thresholds)
