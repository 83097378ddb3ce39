"""Score a trained model on the val and test splits: scores for selection and DVC/MLflow, confusion matrix, pictures."""

from __future__ import annotations

import heapq
import json
import math
import time
from operator import itemgetter
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segflow.config import CrfParams, EvaluateParams, InferenceParams, MlflowParams
from segflow.data.datasets import Sample, SegmentationDataset, load_samples, pad_collate, to_tensor
from segflow.data.imageio import read_image, read_mask
from segflow.errors import SegflowError
from segflow.fsutil import atomic_dir, atomic_write_json, atomic_write_text, csv_text
from segflow.inference.card import ModelCard
from segflow.inference.crf import dense_crf
from segflow.inference.metrics import ConfusionMatrix, confusion_over, labeled_scores, split_fingerprint
from segflow.inference.metrics import scores as metric_scores
from segflow.inference.predictor import (
    load_model,
    logits,
    predict_classes,
    probabilities,
    resolve_device,
    resolved_inference,
)
from segflow.inference.scores import SCORES_FILE
from segflow.inference.visualize import (
    Example,
    confusion_matrix_figure,
    learning_curves_figure,
    per_class_iou_figure,
    save_figure,
    save_overlays,
)
from segflow.registry import tracking


def confusion_with_crf(
    model: torch.nn.Module, samples: list[Sample], num_classes: int, device: torch.device,
    inference: InferenceParams, crf: CrfParams,
) -> tuple[ConfusionMatrix, ConfusionMatrix]:
    """Confusion matrices of the network alone and after the dense CRF, one image at a time (the CRF needs the
    image's own pixels at its own size)."""
    model.eval()
    plain, refined = ConfusionMatrix(num_classes, device), ConfusionMatrix(num_classes, device)
    for sample in samples:
        image = read_image(sample.image_path)
        target = torch.from_numpy(read_mask(sample.mask_path)).long().to(device)[None]
        probs = probabilities(model, to_tensor(image)[None].to(device), inference)[0]
        plain.update(target, probs.argmax(0)[None])
        refined.update(target, dense_crf(image, probs, crf).argmax(0)[None])
    return plain, refined


def _finite_or_none(value: float | None) -> float | None:
    """An undefined score (a class absent from the split: NaN) is written as null, never as NaN."""
    return None if value is None or not math.isfinite(value) else value


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward-pass GFLOPs for one size×size image (multiply-adds count as two), at the training size."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device=device))
    return counter.get_total_flops() / 1e9


def _throughput(model: torch.nn.Module, sample: torch.Tensor, device: torch.device, repeats: int = 3) -> float:
    """Inference images per second on one batch of test images (after a warm-up pass)."""
    batch = sample.to(device)
    logits(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        logits(model, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * batch.shape[0] / (time.perf_counter() - started)


def evaluate(
    cfg: EvaluateParams, mlflow_cfg: MlflowParams, name: str, *, device: str, model_dir: Path, data_dir: Path,
    splits_csv: Path, metrics_file: Path, out_dir: Path, plots_dir: Path,
) -> dict[str, Any]:
    """Score ``model_dir`` on the val and test splits with the inference settings it is served with.

    Writes ``out_dir/scores.json`` (everything: both splits, per class, the majority-class baseline, the classes
    predicted, cost; see segflow.inference.scores) with the pictures, the DVC metrics file ``metrics_file`` (the headline
    figures only, so ``dvc metrics show`` fits a terminal) and the DVC plot tables
    ``plots_dir/{history,per_class_iou}/NAME.csv``. Returns the scores."""
    device = resolve_device(device)
    model, card = load_model(model_dir, device)
    # What the model is scored with, the window made concrete: register serves it with exactly these.
    inference = resolved_inference(cfg.inference, card, model_dir)
    samples = load_samples(data_dir, splits_csv, "test")
    val_samples = load_samples(data_dir, splits_csv, "val")
    if not samples or not val_samples:
        raise SegflowError(f"{splits_csv}: the {'test' if not samples else 'val'} split is empty; models are chosen "
                           "on val and reported on test, so both need images.")
    loader = DataLoader(SegmentationDataset(samples), batch_size=cfg.batch_size, collate_fn=pad_collate)
    val_loader = DataLoader(SegmentationDataset(val_samples), batch_size=cfg.batch_size, collate_fn=pad_collate)
    # One pass over test: the split's confusion and its worst images (the overlays) from the same predictions.
    confusion, worst = _test_pass(model, loader, card.num_classes, inference, cfg.num_overlays)
    val_confusion = confusion_over(model, val_loader, card.num_classes, device, inference)
    names = card.classes
    test = _split_scores(labeled_scores(confusion, splits_csv, "test"), names, len(samples))
    predicted = confusion.matrix.sum(dim=0).cpu().numpy()
    history = json.loads((Path(model_dir) / "history.json").read_text())
    scores = {
        "name": name,
        "arch": card.arch,
        "val": _split_scores(labeled_scores(val_confusion, splits_csv, "val"), names, len(val_samples)),
        "test": {**test, "data_hash": split_fingerprint(samples),
                 "predicted_classes": [n for n, count in zip(names, predicted) if count > 0]},
        "majority_baseline": majority_baseline(confusion.matrix.cpu().numpy(), names),
        "inference": inference.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "best_epoch": card.extra.get("best_epoch"),
        "training_val_miou": _finite_or_none(card.extra.get("val_miou")),  # as training validated: plain, maybe EMA
        "train_seconds": card.extra.get("train_seconds"),
        "training_end": card.extra.get("training_end"),  # where training stopped and why (train.patience)
        "gflops": None if card.crop_size is None else gflops(model, card.crop_size),  # unknown for a card without it
        "images_per_second": _throughput(model, next(iter(loader))["image"], device),
    }
    if cfg.crf.enabled:  # the headline score stays the network's own: the registered model serves without the CRF
        _, crf_confusion = confusion_with_crf(model, samples, card.num_classes, device, inference, cfg.crf)
        scores["test_crf"] = _split_scores(crf_confusion.compute(), names, len(samples))
    headline = {"val_miou": scores["val"]["miou"], "test_miou": test["miou"],
                "test_pixel_accuracy": test["pixel_accuracy"], "test_mean_class_accuracy": test["mean_class_accuracy"]}
    with tracking.stage_run(mlflow_cfg, "evaluate", f"evaluate-{name}") as run, atomic_dir(out_dir) as staging:
        _save_pictures(staging, confusion, scores, history, worst, samples, names)
        tables = _write_plot_tables(Path(plots_dir), name, scores["test"], history, names)
        atomic_write_json(staging / SCORES_FILE, scores)
        atomic_write_json(metrics_file, headline)
        _log_to_mlflow(run.info.run_id, card, scores, staging, Path(metrics_file), tables)
    return scores


def _save_pictures(
    pictures_dir: Path, confusion: ConfusionMatrix, scores: dict[str, Any], history: list[dict],
    worst: list[tuple[float, int, np.ndarray]], samples: list[Sample], names: list[str],
) -> None:
    """The test split's confusion matrix, per-class IoU and ``worst`` images (overlays), and the learning curves
    with where training stopped, as pictures in ``pictures_dir``."""
    test = scores["test"]
    save_figure(confusion_matrix_figure(confusion.matrix.cpu().numpy(), names), pictures_dir / "confusion_matrix.png")
    save_figure(per_class_iou_figure(test["per_class_iou"], test["miou"]), pictures_dir / "per_class_iou.png")
    save_figure(learning_curves_figure(history, scores["training_end"]), pictures_dir / "learning_curves.png")
    save_overlays([Example(samples[index].image_id, read_image(samples[index].image_path),
                           read_mask(samples[index].mask_path), prediction, iou) for iou, index, prediction in worst],
                  names, pictures_dir / "overlays", len(samples))


def _write_plot_tables(
    plots_dir: Path, name: str, test: dict[str, Any], history: list[dict], names: list[str],
) -> dict[str, Path]:
    """The DVC plot tables: the test split's per-class IoU and the training history; returns each by its folder."""
    tables = {table: plots_dir / table / f"{name}.csv" for table in ("per_class_iou", "history")}
    atomic_write_text(tables["per_class_iou"], csv_text(["class", "iou"], [[n, test["per_class_iou"][n]] for n in names]))
    atomic_write_text(tables["history"], csv_text(["epoch", "train_loss", "val_miou"],
                                                  [[h["epoch"], h["train_loss"], h.get("val_miou")] for h in history]))
    return tables


def _log_to_mlflow(
    stage_run_id: str, card: ModelCard, scores: dict[str, Any], pictures_dir: Path, metrics_file: Path,
    tables: dict[str, Path],
) -> None:
    """The scores as metrics, ``pictures_dir`` and ``metrics_file`` in ``evaluation`` and ``tables`` in
    ``evaluation/TABLE``, on this stage's run and on the model's training run: the run its registered version links
    to shows the scores and pictures it was chosen by (a later evaluation of the model logs over them)."""
    # "evaluated_val_*": the training run's "val_*" are its per-epoch validation, plain (maybe EMA) weights.
    logged = {f"{prefix}_{key}": scores[split][key] for split, prefix in (("val", "evaluated_val"), ("test", "test"))
              for key in HEADLINE if scores[split][key] is not None}
    logged |= {f"majority_baseline_{key}": scores["majority_baseline"][key] for key in HEADLINE}
    logged |= {f"test_iou_{n}": v for n, v in scores["test"]["per_class_iou"].items() if v is not None}
    training_run = tracking.training_run(card.extra)
    mlflow.set_tags({"segflow.arch": card.arch, "segflow.training_run_id": training_run or "unknown"})
    for run_id in filter(None, (stage_run_id, training_run)):
        MlflowClient().set_tag(run_id, "segflow.test_data_hash", scores["test"]["data_hash"])
        mlflow.log_metrics(logged, run_id=run_id)
        mlflow.log_artifacts(str(pictures_dir), artifact_path="evaluation", run_id=run_id)
        mlflow.log_artifact(str(metrics_file), artifact_path="evaluation", run_id=run_id)
        for table, path in tables.items():
            mlflow.log_artifact(str(path), artifact_path=f"evaluation/{table}", run_id=run_id)


HEADLINE = ("miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice")


def _split_scores(scores: dict[str, Any], names: list[str], images: int) -> dict[str, Any]:
    """One split's scores as written: the headline figures, per class by name (null: class absent), the count."""
    return {
        **{key: _finite_or_none(scores[key]) for key in HEADLINE},
        "per_class_iou": {n: _finite_or_none(v) for n, v in zip(names, scores["per_class_iou"])},
        "per_class_accuracy": {n: _finite_or_none(v) for n, v in zip(names, scores["per_class_accuracy"])},
        "images": images,
    }


def majority_baseline(confusion: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The scores of predicting the most frequent true class everywhere, on the confusion's pixels: what a
    collapsed model reaches, and what any model worth promoting must beat."""
    truth = confusion.sum(axis=1)
    majority = int(truth.argmax())
    constant = np.zeros_like(confusion)
    constant[:, majority] = truth
    baseline = metric_scores(constant)
    return {"class": names[majority], **{key: _finite_or_none(baseline[key]) for key in HEADLINE}}


def _test_pass(
    model: torch.nn.Module, loader: DataLoader, num_classes: int, inference: InferenceParams, worst: int,
) -> tuple[ConfusionMatrix, list[tuple[float, int, np.ndarray]]]:
    """The split's confusion matrix (``model`` predicting as served) and its ``worst`` images by per-image IoU,
    worst first, as (IoU, index in the split, predicted mask): where the model fails, not the first images. The
    per-image IoU is the mean over the classes in the image's truth or prediction (ignored pixels and the batch
    padding left out); an image with every pixel ignored has none and is never among the worst."""
    model.eval()
    device = next(model.parameters()).device
    confusion = ConfusionMatrix(num_classes)
    per_image: list[tuple[float, int, np.ndarray]] = []
    for batch in loader:
        predictions = predict_classes(model, batch["image"].to(device), inference).cpu()
        for index, (height, width), truth, predicted in zip(
            batch["index"].tolist(), batch["size"].tolist(), batch["mask"], predictions,
        ):
            image = ConfusionMatrix(num_classes)
            image.update(truth, predicted)
            confusion.matrix += image.matrix
            iou = image.compute()["miou"]
            if worst and not math.isnan(iou):
                per_image.append((iou, index, predicted[:height, :width].to(torch.uint8).numpy()))
                per_image = heapq.nsmallest(worst, per_image, key=itemgetter(0))  # k masks in memory, not all
    return confusion, per_image
