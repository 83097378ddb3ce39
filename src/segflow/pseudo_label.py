"""Pseudo-labels: the teacher predicts the unlabeled images; confident pixels become labels, the rest ignore.

Inference is batched and each mask is written as soon as it is predicted, so memory stays flat in the number
of unlabeled images.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader

from segflow import IGNORE_INDEX, tracking
from segflow.config import Params
from segflow.data import SegmentationDataset, load_samples, pad_collate
from segflow.fsutil import atomic_dir, atomic_write_json
from segflow.imageio import read_image, write_mask
from segflow.inference import load_model, probabilities, resolve_device
from segflow.visualize import colorize, save_grid


def confident_labels(probabilities: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with IGNORE_INDEX where confidence < threshold, confidence) from N×K×H×W probabilities."""
    confidence, labels = probabilities.max(dim=1)
    labels = labels.masked_fill(confidence < threshold, IGNORE_INDEX)
    return labels, confidence


def pseudo_label(params: Params, *, teacher_dir: Path, data_dir: Path, splits_csv: Path, out_dir: Path) -> dict:
    """Write ``out_dir/masks/*.png``, ``pseudo_manifest.csv`` and ``coverage.json``; returns the coverage summary."""
    cfg = params.pseudo_label
    device = resolve_device(params.train.device)
    model, card = load_model(teacher_dir, device)
    samples = load_samples(data_dir, splits_csv, "unlabeled")
    loader = DataLoader(
        SegmentationDataset(samples), batch_size=cfg.batch_size, collate_fn=pad_collate,
        num_workers=params.train.num_workers, pin_memory=device.type == "cuda",
    )
    class_pixels = torch.zeros(card.num_classes, dtype=torch.int64, device=device)
    kept = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    examples: list[list[np.ndarray]] = []
    out_dir = Path(out_dir)
    with tracking.stage_run(params.mlflow, "pseudo_label"), atomic_dir(out_dir) as staging:
        (staging / "masks").mkdir()
        with open(staging / "pseudo_manifest.csv", "w", newline="") as manifest_file:
            manifest = csv.writer(manifest_file)
            manifest.writerow(["image_id", "image_path", "mask_path"])
            for batch in loader:
                # The teacher predicts as evaluation does (sliding window, test-time augmentation).
                teacher_probabilities = probabilities(
                    model, batch["image"].to(device), params.evaluate.inference, params.train.crop_size)
                labels, confidence = confident_labels(teacher_probabilities, cfg.threshold)
                for row, index in enumerate(batch["index"].tolist()):
                    sample = samples[index]
                    height, width = batch["size"][row].tolist()
                    mask = labels[row, :height, :width]
                    valid = mask != IGNORE_INDEX
                    class_pixels += torch.bincount(mask[valid], minlength=card.num_classes)
                    kept += valid.sum()
                    total += height * width
                    mask_np = mask.to(torch.uint8).cpu().numpy()
                    write_mask(staging / "masks" / f"{sample.image_id}.png", mask_np)
                    manifest.writerow([
                        sample.image_id, os.path.relpath(sample.image_path, out_dir), f"masks/{sample.image_id}.png",
                    ])
                    if len(examples) < 4:
                        examples.append([
                            read_image(sample.image_path), colorize(mask_np, card.num_classes),
                            confidence[row, :height, :width].float().cpu().numpy(),
                        ])
        pixels = class_pixels.cpu().numpy()
        summary = {
            "images": len(samples),
            "threshold": cfg.threshold,
            "coverage": float(kept.item() / total) if total else 0.0,
            "class_share": {
                name: float(pixels[i] / pixels.sum()) if pixels.sum() else 0.0 for i, name in enumerate(card.classes)
            },
        }
        atomic_write_json(staging / "coverage.json", summary)
        save_grid(examples, ["image", "pseudo mask", "confidence"], staging / "examples.png")
        mlflow.log_params({"teacher_arch": card.arch, "threshold": cfg.threshold, "unlabeled_images": len(samples)})
        mlflow.log_metrics({"coverage": summary["coverage"],
                            **{f"class_share_{k}": v for k, v in summary["class_share"].items()}})
        mlflow.log_artifact(str(staging / "coverage.json"))
        if examples:
            mlflow.log_artifact(str(staging / "examples.png"))
    return summary
