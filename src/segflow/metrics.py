"""Segmentation metrics from a confusion matrix (rows: truth, columns: prediction).

Classes absent from both truth and prediction have an undefined IoU; they are NaN per class and left out of
the means, as MMSegmentation and torchvision's reference do. The means are therefore NaN only when no pixel is
labeled: callers refuse that case (a NaN score is never a "best" model nor a number in a metrics file).
"""

from __future__ import annotations

import numpy as np
import torch

from segflow import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates on the tensors' device, so training never synchronises with the host per batch."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        keep = target != IGNORE_INDEX
        k = self.num_classes
        index = target[keep].long() * k + prediction[keep].long()
        self.matrix += torch.bincount(index, minlength=k * k).reshape(k, k)

    def compute(self) -> dict[str, object]:
        return scores(self.matrix.cpu().numpy())


def scores(confusion: np.ndarray) -> dict[str, object]:
    """mIoU, per-class IoU, pixel accuracy, mean class accuracy and Dice from a K×K confusion matrix."""
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion)
    truth = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    union = truth + predicted - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        class_accuracy = np.where(truth > 0, true_positive / truth, np.nan)
        dice = np.where(truth + predicted > 0, 2 * true_positive / (truth + predicted), np.nan)
    total = confusion.sum()
    return {
        "miou": _nanmean(iou),
        "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
        "mean_class_accuracy": _nanmean(class_accuracy),
        "mean_dice": _nanmean(dice),
        "per_class_iou": iou.tolist(),
        "per_class_accuracy": class_accuracy.tolist(),
        "per_class_dice": dice.tolist(),
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
