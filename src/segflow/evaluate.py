"""Score a trained model on the test split: metrics for DVC and MLflow, confusion matrix and overlays."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from pathlib import Path

import mlflow
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segflow import tracking
from segflow.config import CrfParams, InferenceParams, Params
from segflow.crf import dense_crf
from segflow.data import SegmentationDataset, Sample, load_samples, pad_collate, to_tensor
from segflow.errors import SegflowError
from segflow.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from segflow.imageio import read_image, read_mask
from segflow.inference import load_model, logits, predict_classes, predict_mask, probabilities, resolve_device
from segflow.metrics import ConfusionMatrix
from segflow.visualize import colorize, overlay, save_confusion_matrix, save_grid


def confusion_over(
    model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device,
    inference: InferenceParams | None = None, train_crop_size: int | None = None,
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over every batch of ``loader`` (accumulated on the device).

    Plain whole-image logits unless ``inference`` (sliding window, test-time augmentation) is given.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        prediction = predict_classes(model, images, inference, train_crop_size)
        confusion.update(batch["mask"].to(device, non_blocking=True), prediction)
    return confusion


def confusion_with_crf(
    model: torch.nn.Module, samples: list[Sample], num_classes: int, device: torch.device,
    inference: InferenceParams, train_crop_size: int, crf: CrfParams,
) -> tuple[ConfusionMatrix, ConfusionMatrix]:
    """Confusion matrices of the network alone and after the dense CRF, one image at a time (the CRF needs the
    image's own pixels at its own size)."""
    model.eval()
    plain, refined = ConfusionMatrix(num_classes, device), ConfusionMatrix(num_classes, device)
    for sample in samples:
        image = read_image(sample.image_path)
        target = torch.from_numpy(read_mask(sample.mask_path)).long().to(device)[None]
        probs = probabilities(model, to_tensor(image)[None].to(device), inference, train_crop_size)[0]
        plain.update(target, probs.argmax(0)[None])
        refined.update(target, dense_crf(image, probs, crf).argmax(0)[None])
    return plain, refined


def score_split(params: Params, model_dir: Path, data_dir: Path, splits_csv: Path, split: str) -> dict | None:
    """A model folder's scores on one split, predicted as evaluation predicts (None when the split is empty;
    refused when it has no labeled pixel)."""
    samples = load_samples(data_dir, splits_csv, split)
    if not samples:
        return None
    device = resolve_device(params.train.device)
    model, card = load_model(model_dir, device)
    loader = DataLoader(SegmentationDataset(samples), batch_size=params.evaluate.batch_size, collate_fn=pad_collate)
    confusion = confusion_over(model, loader, card.num_classes, device, params.evaluate.inference,
                               params.train.crop_size)
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
    params: Params,
    name: str,
    *,
    model_dir: Path,
    data_dir: Path,
    splits_csv: Path,
    metrics_file: Path,
    out_dir: Path,
    plots_dir: Path,
) -> dict[str, object]:
    """Evaluate ``model_dir`` on the test split; writes ``metrics_file`` (JSON), pictures in ``out_dir`` and the
    DVC plot tables ``plots_dir/{history,per_class_iou}/NAME.csv``."""
    device = resolve_device(params.train.device)
    model, card = load_model(model_dir, device)
    samples = load_samples(data_dir, splits_csv, "test")
    if not samples:
        raise SegflowError(f"{splits_csv}: the test split is empty; nothing to evaluate.")
    loader = DataLoader(SegmentationDataset(samples), batch_size=params.evaluate.batch_size, collate_fn=pad_collate)
    inference = params.evaluate.inference
    crf = params.evaluate.crf
    if crf.enabled:
        confusion, crf_confusion = confusion_with_crf(
            model, samples, card.num_classes, device, inference, params.train.crop_size, crf)
    else:
        confusion = confusion_over(model, loader, card.num_classes, device, inference, params.train.crop_size)
    scores = labeled_scores(confusion, splits_csv, "test")
    names = card.classes
    history = json.loads((Path(model_dir) / "history.json").read_text())
    metrics = {
        "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "mean_class_accuracy": scores["mean_class_accuracy"],
        "mean_dice": scores["mean_dice"],
        "per_class_iou": {n: _finite_or_none(v) for n, v in zip(names, scores["per_class_iou"])},
        "per_class_accuracy": {n: _finite_or_none(v) for n, v in zip(names, scores["per_class_accuracy"])},
        "arch": card.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "best_val_miou": card.extra.get("val_miou"),
        "best_epoch": card.extra.get("best_epoch"),
        "train_seconds": card.extra.get("train_seconds"),
        "gflops": gflops(model, params.train.crop_size),
        "test_images": len(samples),
        "test_data_hash": split_fingerprint(samples),
        "images_per_second": _throughput(model, next(iter(loader))["image"], device),
    }
    if crf.enabled:  # the headline score stays the network's own: the registered model serves without the CRF
        crf_scores = crf_confusion.compute()
        metrics.update({f"{key}_crf": crf_scores[key] for key in ("miou", "pixel_accuracy", "mean_class_accuracy")})
    metrics = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()}

    with tracking.stage_run(params.mlflow, "evaluate", f"evaluate-{name}"), atomic_dir(out_dir) as staging:
        save_confusion_matrix(confusion.matrix.cpu().numpy(), names, staging / "confusion_matrix.png")
        _save_overlays(model, samples[: params.evaluate.num_overlays], card.num_classes, staging / "overlays.png",
                       inference, params.train.crop_size)
        atomic_write_text(Path(plots_dir) / "per_class_iou" / f"{name}.csv",
                          _csv_text(["class", "iou"], [[n, metrics["per_class_iou"][n]] for n in names]))
        atomic_write_text(Path(plots_dir) / "history" / f"{name}.csv",
                          _csv_text(["epoch", "train_loss", "val_miou"],
                                    [[h["epoch"], h["train_loss"], h["val_miou"]] for h in history]))
        atomic_write_json(metrics_file, metrics)
        mlflow.set_tags({"segflow.arch": card.arch, "segflow.test_data_hash": metrics["test_data_hash"]})
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool)})
        mlflow.log_metrics({f"test_iou_{n}": v for n, v in metrics["per_class_iou"].items() if v is not None})
        mlflow.log_artifacts(str(staging), artifact_path="evaluation")
        mlflow.log_artifact(str(metrics_file), artifact_path="evaluation")
        for table in ("per_class_iou", "history"):
            mlflow.log_artifact(str(Path(plots_dir) / table / f"{name}.csv"), artifact_path=f"evaluation/{table}")
    return metrics


def _save_overlays(
    model: torch.nn.Module, samples: list[Sample], num_classes: int, path: Path, inference: InferenceParams,
    train_crop_size: int,
) -> None:
    rows = []
    for sample in samples:
        image = read_image(sample.image_path)
        prediction = predict_mask(model, image, inference, train_crop_size)
        truth = read_mask(sample.mask_path)
        rows.append([image, colorize(truth, num_classes), overlay(image, prediction, num_classes)])
    save_grid(rows, ["image", "truth", "prediction"], path)


def _csv_text(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def compare_metrics(metrics: dict[str, dict[str, object]], key: str = "miou") -> list[tuple[str, float]]:
    """Architectures ranked by ``key``, best first; an evaluation without a finite score is refused, not ranked."""
    ranked = []
    for name, scores in metrics.items():
        value = scores.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SegflowError(
                f"the evaluation of {name} has no test {key} (found {value!r}): a model without a score cannot be "
                f"ranked or registered. Run `segflow evaluate --arch {name}` again.")
        ranked.append((name, float(value)))
    return sorted(ranked, key=lambda item: item[1], reverse=True)
