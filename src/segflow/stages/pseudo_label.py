"""Pseudo-labels: the teacher predicts the unlabeled images; confident pixels become labels, the rest ignore.

Two passes over the images, so memory stays flat in their number: the first runs the teacher (batched, with
the evaluation's test-time augmentation, mixed precision on CUDA) and streams each image's prediction and
confidence to disk while it counts a confidence histogram per class; the thresholds follow from the histograms
(one global threshold, or class-balanced ones); the second pass applies them and writes the masks.

Quality is measured where it can be: images whose masks were hidden by the semi-supervised protocol
(``split.labeled_fraction``) score the pseudo-labels per class; earlier teacher checkpoints
(``teacher.snapshots``) rank the images by how stable their prediction was during training (ST++).
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader

from segflow import IGNORE_INDEX
from segflow.config import InferenceParams, MlflowParams, PseudoLabelParams, TrainParams
from segflow.data.datasets import Sample, SegmentationDataset, load_samples, pad_collate
from segflow.data.imageio import read_image, read_mask, write_mask
from segflow.fsutil import atomic_dir, atomic_open, atomic_write_json
from segflow.inference.card import EMA_DIR, SNAPSHOTS_DIR, ModelCard
from segflow.inference.metrics import ConfusionMatrix
from segflow.inference.predictor import load_model, probabilities, resolve_device, resolved_inference
from segflow.inference.visualize import colorize, save_grid
from segflow.registry import tracking
from segflow.training.targets import HISTOGRAM_BINS, class_thresholds, confidence_histograms, corrected

GRID_EXAMPLES = 4
PRIOR_CORRECTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # tried by prior_correction: auto


@dataclass(frozen=True)
class Teacher:
    """The network that labels, as it labels: with ``inference`` (its window made concrete), undoing the bias of
    the ``class_weight`` it was trained with (None: trained without), checked against its earlier ``snapshots``."""

    model: torch.nn.Module
    card: ModelCard
    inference: InferenceParams
    class_weight: torch.Tensor | None
    device: torch.device
    snapshots: list[torch.nn.Module] = field(default_factory=list)


def load_teacher(teacher_dir: Path, inference: InferenceParams, device: torch.device) -> Teacher:
    """The teacher in ``teacher_dir`` with its snapshots, predicting as ``inference`` says."""
    # A Mean Teacher kept beside trained weights that were evaluated instead (train.ema.evaluate: false) labels.
    model_dir = teacher_dir / EMA_DIR if (teacher_dir / EMA_DIR).is_dir() else teacher_dir
    model, card = load_model(model_dir, device)
    snapshots = [load_model(path, device)[0] for path in sorted((teacher_dir / SNAPSHOTS_DIR).glob("epoch_*"))]
    class_weight = card.extra.get("class_weight")
    return Teacher(model, card, resolved_inference(inference, card, model_dir),
                   None if class_weight is None else torch.tensor(class_weight, device=device), device, snapshots)


def choose_prior_correction(
    cfg: PseudoLabelParams, teacher: Teacher, val_samples: list[Sample], num_workers: int,
) -> tuple[float, dict[str, float]]:
    """The correction strength, and the teacher's val mIoU for each strength tried: ``auto`` picks the one with
    the best val mIoU (labeled images the teacher did not train on); a number is used as it is."""
    if teacher.class_weight is None:  # the teacher was trained without class weighting: nothing to undo
        return 0.0, {}
    if cfg.prior_correction != "auto":
        return float(cfg.prior_correction), {}
    if not val_samples:
        return 0.0, {}
    device = teacher.device
    confusions = {strength: ConfusionMatrix(teacher.card.num_classes, device) for strength in PRIOR_CORRECTIONS}
    loader = DataLoader(SegmentationDataset(val_samples), batch_size=cfg.batch_size, collate_fn=pad_collate,
                        num_workers=num_workers)
    for batch in loader:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        probs = probabilities(teacher.model, images, teacher.inference)
        for strength, confusion in confusions.items():
            confusion.update(masks, corrected(probs, teacher.class_weight, strength).argmax(dim=1))
    val_miou = {f"{strength:g}": confusion.compute()["miou"] for strength, confusion in confusions.items()}
    best = max(PRIOR_CORRECTIONS, key=lambda strength: val_miou[f"{strength:g}"])
    return best, val_miou


def prediction_agreement(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Mean IoU between two label maps over the classes present in either (ST++'s stability score)."""
    pairs = torch.bincount((a * num_classes + b).flatten(), minlength=num_classes * num_classes)
    confusion = pairs.reshape(num_classes, num_classes).double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if present.any() else 1.0


def _predict_and_stream(
    cfg: PseudoLabelParams, teacher: Teacher, strength: float, samples: list[Sample], raw_dir: Path, num_workers: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pass 1: write each image's labels and confidence to ``raw_dir``; returns class histograms and the
    images' reliability (mean agreement of the snapshots with the final teacher; 1 without snapshots)."""
    device, num_classes = teacher.device, teacher.card.num_classes
    loader = DataLoader(
        SegmentationDataset(samples), batch_size=cfg.batch_size, collate_fn=pad_collate,
        num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    histograms = torch.zeros(num_classes, HISTOGRAM_BINS, dtype=torch.int64, device=device)
    reliability: dict[str, float] = {}
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        # The teacher predicts as evaluation does (sliding window, test-time augmentation).
        probs = probabilities(teacher.model, images, teacher.inference)
        confidence, labels = corrected(probs, teacher.class_weight, strength).max(dim=1)
        # Snapshots predict as the teacher does (TTA included): agreement then measures stability, not TTA.
        snapshot_labels = [probabilities(snapshot, images, teacher.inference).argmax(dim=1)
                           for snapshot in teacher.snapshots]
        for row, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            height, width = batch["size"][row].tolist()
            image_labels = labels[row, :height, :width]
            histograms += confidence_histograms(image_labels, confidence[row, :height, :width], num_classes)
            agreements = [prediction_agreement(s[row, :height, :width], image_labels, num_classes)
                          for s in snapshot_labels]
            reliability[sample.image_id] = float(np.mean(agreements)) if agreements else 1.0
            np.save(raw_dir / f"{sample.image_id}.labels.npy", image_labels.to(torch.uint8).cpu().numpy())
            np.save(raw_dir / f"{sample.image_id}.confidence.npy",
                    confidence[row, :height, :width].to(torch.float16).cpu().numpy())
    return histograms.cpu(), reliability


class PseudoLabelScore:
    """Pseudo-labels against the hidden ground truth: per-class precision of the kept pixels, and the accuracy
    of all the teacher's predictions (what thresholding bought)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.kept = np.zeros(num_classes, dtype=np.int64)          # kept pixels labeled c that have a truth
        self.kept_correct = np.zeros(num_classes, dtype=np.int64)
        self.scored_pixels = 0
        self.predicted_correct = 0

    def update(self, predicted: np.ndarray, pseudo: np.ndarray, truth: np.ndarray) -> None:
        known = truth != IGNORE_INDEX
        self.scored_pixels += int(known.sum())
        self.predicted_correct += int((predicted == truth)[known].sum())
        kept = known & (pseudo != IGNORE_INDEX)
        self.kept += np.bincount(pseudo[kept], minlength=self.num_classes)[: self.num_classes]
        self.kept_correct += np.bincount(pseudo[kept & (pseudo == truth)], minlength=self.num_classes)[: self.num_classes]

    def summary(self, classes: list[str]) -> dict:
        if not self.scored_pixels:
            return {}
        return {
            "hidden_mask_pixels": self.scored_pixels,
            "teacher_accuracy": self.predicted_correct / self.scored_pixels,
            "pseudo_accuracy": float(self.kept_correct.sum() / max(1, self.kept.sum())),
            "pseudo_class_accuracy": {
                name: float(self.kept_correct[c] / self.kept[c]) if self.kept[c] else None
                for c, name in enumerate(classes)
            },
        }


LABEL_NEXT_COLUMNS = ["rank", "image_id", "image_path", "priority", "mean_confidence", "reliability", "coverage",
                      "rare_class_share", "teacher_error"]


def label_priority(mean_confidence: float, reliability: float, rare_class_share: float) -> float:
    """How much a label would help, in [0, 1]: the teacher's doubt (one minus its mean confidence times the
    ST++ stability of its prediction), raised by up to half for images whose pixels it gives to the classes
    it rarely predicts (the classes the labeled set shows least)."""
    doubt = 1.0 - mean_confidence * reliability
    return doubt * (1.0 + 0.5 * rare_class_share) / 1.5


def write_label_next(rows: list[dict], path: Path) -> None:
    """``rows`` (one per unlabeled image) ranked by priority, most useful to annotate first, as CSV."""
    ranked = sorted(rows, key=lambda row: (-row["priority"], row["image_id"]))
    with atomic_open(path, "w", newline="") as out:
        table = csv.writer(out)
        table.writerow(LABEL_NEXT_COLUMNS)
        for rank, row in enumerate(ranked, 1):
            values = {**row, "rank": rank}
            table.writerow(["" if values[c] is None else f"{values[c]:.6f}" if isinstance(values[c], float)
                            else values[c] for c in LABEL_NEXT_COLUMNS])


def rare_classes(histograms: torch.Tensor) -> np.ndarray:
    """Which classes the teacher gives fewer pixels than an even share (``histograms``: its confidence histogram
    per class): the ones a label would show it most."""
    predicted_share = histograms.sum(dim=1).double()
    predicted_share = (predicted_share / predicted_share.sum().clamp_min(1)).numpy()
    return predicted_share < 1.0 / len(predicted_share)


class PseudoMasks:
    """Pass 2, the thresholds known: each image's mask (the teacher's label where its confidence clears the class
    threshold, ignore elsewhere), its manifest row, and what the summary, ``label_next.csv`` and ``examples.png``
    keep of it."""

    def __init__(self, thresholds: np.ndarray, rare: np.ndarray, reliability: dict[str, float], num_classes: int):
        self.thresholds, self.rare, self.reliability, self.num_classes = thresholds, rare, reliability, num_classes
        self.class_pixels = np.zeros(num_classes, dtype=np.int64)
        self.kept_pixels = self.total_pixels = 0
        self.score = PseudoLabelScore(num_classes)
        self.label_rows: list[dict] = []
        self.examples: list[list[np.ndarray]] = []

    def write(self, samples: list[Sample], raw_dir: Path, staging: Path, out_dir: Path) -> None:
        """``staging/masks/*.png`` and ``staging/pseudo_manifest.csv`` (image paths relative to ``out_dir``) from
        the predictions pass 1 left in ``raw_dir``."""
        (staging / "masks").mkdir()
        with open(staging / "pseudo_manifest.csv", "w", newline="") as manifest_file:
            manifest = csv.writer(manifest_file)
            manifest.writerow(["image_id", "image_path", "mask_path", "reliability", "coverage"])
            for sample in samples:
                kept = self._write_mask(sample, raw_dir, staging / "masks")
                manifest.writerow([
                    sample.image_id, os.path.relpath(sample.image_path, out_dir), f"masks/{sample.image_id}.png",
                    f"{self.reliability[sample.image_id]:.6f}", f"{kept.mean():.6f}",
                ])

    def _write_mask(self, sample: Sample, raw_dir: Path, masks_dir: Path) -> np.ndarray:
        """Threshold, write and count one image's mask; returns which of its pixels were kept."""
        predicted = np.load(raw_dir / f"{sample.image_id}.labels.npy")
        confidence = np.load(raw_dir / f"{sample.image_id}.confidence.npy").astype(np.float32)
        pseudo = np.where(confidence >= self.thresholds[predicted], predicted, IGNORE_INDEX).astype(np.uint8)
        write_mask(masks_dir / f"{sample.image_id}.png", pseudo)
        kept = pseudo != IGNORE_INDEX
        self.class_pixels += np.bincount(pseudo[kept], minlength=self.num_classes)[: self.num_classes]
        self.kept_pixels += int(kept.sum())
        self.total_pixels += pseudo.size
        teacher_error = self._score_hidden_mask(sample, predicted, pseudo)
        mean_confidence = float(confidence.mean())
        rare_class_share = float(self.rare[predicted].mean())
        self.label_rows.append({
            "image_id": sample.image_id, "image_path": str(sample.image_path),
            "priority": label_priority(mean_confidence, self.reliability[sample.image_id], rare_class_share),
            "mean_confidence": mean_confidence, "reliability": self.reliability[sample.image_id],
            "coverage": float(kept.mean()), "rare_class_share": rare_class_share, "teacher_error": teacher_error,
        })
        if len(self.examples) < GRID_EXAMPLES:
            self.examples.append([read_image(sample.image_path), colorize(pseudo, self.num_classes), confidence])
        return kept

    def _score_hidden_mask(self, sample: Sample, predicted: np.ndarray, pseudo: np.ndarray) -> float | None:
        """Score the image's pseudo-labels against its mask when the semi-supervised protocol hid one; returns the
        teacher's error on its labeled pixels (None: no mask, or none labeled)."""
        if sample.mask_path is None:
            return None
        truth = read_mask(sample.mask_path)
        self.score.update(predicted, pseudo, truth)
        known = truth != IGNORE_INDEX
        return float((predicted != truth)[known].mean()) if known.any() else None

    @property
    def coverage(self) -> float:
        """The fraction of the pixels written that were kept."""
        return self.kept_pixels / self.total_pixels if self.total_pixels else 0.0

    def class_share(self, classes: list[str]) -> dict[str, float]:
        """Each class's share of the kept pixels."""
        total = self.class_pixels.sum()
        return {name: float(self.class_pixels[i] / total) if total else 0.0 for i, name in enumerate(classes)}


def pseudo_label(
    cfg: PseudoLabelParams,
    train: TrainParams,
    inference: InferenceParams,
    mlflow_cfg: MlflowParams,
    *,
    teacher_dir: Path,
    data_dir: Path,
    splits_csv: Path,
    out_dir: Path,
    metrics_file: Path | None = None,
    label_next_file: Path | None = None,
) -> dict:
    """Write ``out_dir/masks/*.png``, ``pseudo_manifest.csv`` (with each image's reliability and coverage) and
    ``examples.png``; returns the summary (coverage, thresholds, quality), also written to ``metrics_file``.
    ``label_next_file`` gets the unlabeled images ranked by how much a label would help (:func:`label_priority`;
    with masks hidden by the semi-supervised protocol, the teacher's error on each is a column too)."""
    out_dir = Path(out_dir)
    teacher = load_teacher(Path(teacher_dir), inference, resolve_device(train.device))
    card = teacher.card
    samples = load_samples(data_dir, splits_csv, "unlabeled")
    with tracking.stage_run(mlflow_cfg, "pseudo_label"), atomic_dir(out_dir) as staging:
        raw_dir = staging / ".raw"
        raw_dir.mkdir()
        strength, correction_val_miou = choose_prior_correction(
            cfg, teacher, load_samples(data_dir, splits_csv, "val"), train.num_workers)
        histograms, reliability = _predict_and_stream(cfg, teacher, strength, samples, raw_dir, train.num_workers)
        thresholds = class_thresholds(histograms, cfg.threshold,
                                      cfg.class_keep_fraction if cfg.class_balanced else None).numpy()
        masks = PseudoMasks(thresholds, rare_classes(histograms), reliability, card.num_classes)
        masks.write(samples, raw_dir, staging, out_dir)
        shutil.rmtree(raw_dir)
        summary = {
            "images": len(samples),
            "coverage": masks.coverage,
            "class_balanced": cfg.class_balanced,
            "prior_correction": strength,
            "prior_correction_val_miou": correction_val_miou,
            "thresholds": {name: float(thresholds[i]) for i, name in enumerate(card.classes)},
            "class_share": masks.class_share(card.classes),
            "mean_reliability": float(np.mean(list(reliability.values()))) if reliability else None,
            **masks.score.summary(card.classes),
        }
        save_grid(masks.examples, ["image", "pseudo mask", "confidence"], staging / "examples.png")
        _log_to_mlflow(summary, card.arch, cfg, staging / "examples.png")
        if label_next_file is not None:
            write_label_next(masks.label_rows, Path(label_next_file))
            mlflow.log_artifact(str(label_next_file))
    if metrics_file is not None:
        atomic_write_json(metrics_file, summary)
    return summary


def _log_to_mlflow(summary: dict, teacher_arch: str, cfg: PseudoLabelParams, grid: Path) -> None:
    mlflow.log_params({
        "teacher_arch": teacher_arch, "threshold": cfg.threshold, "class_balanced": cfg.class_balanced,
        "class_keep_fraction": cfg.class_keep_fraction, "unlabeled_images": summary["images"],
        "prior_correction_setting": cfg.prior_correction,
    })
    metrics = {"coverage": summary["coverage"], "prior_correction": summary["prior_correction"]}
    for key in ("teacher_accuracy", "pseudo_accuracy", "mean_reliability"):
        if summary.get(key) is not None:
            metrics[key] = summary[key]
    for group in ("thresholds", "class_share", "pseudo_class_accuracy", "prior_correction_val_miou"):
        metrics |= {f"{group}.{name}": value for name, value in summary.get(group, {}).items() if value is not None}
    mlflow.log_metrics({key.replace(" ", "_"): value for key, value in metrics.items()})
    mlflow.log_dict(summary, "pseudo_label_summary.json")
    if grid.exists():
        mlflow.log_artifact(str(grid))
