"""Segmentation metrics from a confusion matrix (rows: truth, columns: prediction), and a model's confusion over a
loader or a split, predicted as evaluation predicts (training's val, the teacher's and register's scores use it).

Classes absent from both truth and prediction have an undefined IoU; they are NaN per class and left out of
the means, as MMSegmentation and torchvision's reference do. The means are therefore NaN only when no pixel is
labeled: callers refuse that case (a NaN score is never a "best" model nor a number in a metrics file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from segflow import IGNORE_INDEX
from segflow.config import InferenceParams
from segflow.data.datasets import Sample, SegmentationDataset, load_samples, pad_collate
from segflow.errors import SegflowError
from segflow.inference.predictor import load_model, predict_classes, resolve_device, resolved_inference


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


def confusion_over(
    model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
    inference: InferenceParams | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over every batch of ``loader`` (accumulated on the device).

    Plain whole-image logits unless ``inference`` (sliding window, test-time augmentation; resolved, see
    :func:`segflow.inference.predictor.resolved_inference`) is given.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        prediction = predict_classes(model, images, inference)
        confusion.update(batch["mask"].to(device, non_blocking=True), prediction)
    return confusion


def score_split(
    model_dir: Path, data_dir: Path, splits_csv: Path, split: str, *, device: str, batch_size: int,
    inference: InferenceParams,
) -> dict | None:
    """A model folder's scores on one split, predicted as evaluation predicts (None when the split is empty;
    refused when it has no labeled pixel)."""
    samples = load_samples(data_dir, splits_csv, split)
    if not samples:
        return None
    resolved = resolve_device(device)
    model, card = load_model(model_dir, resolved)
    settings = resolved_inference(inference, card, model_dir)
    loader = DataLoader(SegmentationDataset(samples), batch_size=batch_size, collate_fn=pad_collate)
    confusion = confusion_over(model, loader, card.num_classes, resolved, settings)
    return labeled_scores(confusion, splits_csv, split)


def labeled_scores(confusion: ConfusionMatrix, splits_csv: Path, split: str) -> dict:
    """The scores of a split with labeled pixels; a split whose masks are all ignore has no mIoU and is refused."""
    if not int(confusion.matrix.sum()):
        raise SegflowError(
            f"{splits_csv}: the {split} split has no labeled pixels (every mask pixel is ignore, 255), so its mIoU "
            "is undefined and no model can be scored on it. Label some of its images, or re-run the validate "
            "stage (validate.min_labeled_pixel_fraction) and the split stage.")
    return confusion.compute()


def split_fingerprint(samples: list[Sample]) -> str:
    """Hash of the test images and masks, so a score is only ever compared with one on the same data."""
    digest = hashlib.sha1()
    for sample in sorted(samples, key=lambda s: s.image_id):
        digest.update(sample.image_id.encode())
        digest.update(sample.image_path.read_bytes())
        if sample.mask_path is not None:
            digest.update(sample.mask_path.read_bytes())
    return digest.hexdigest()
