"""Train one architecture: labeled images (plus pseudo-labeled ones when given), best checkpoint by val mIoU."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from segflow import IGNORE_INDEX, models, tracking
from segflow.config import Params
from segflow.data import Sample, SegmentationDataset, load_pseudo_samples, load_samples, pad_collate, read_classes
from segflow.errors import SegflowError
from segflow.evaluate import confusion_over
from segflow.fsutil import atomic_dir, atomic_write_json
from segflow.imageio import read_mask
from segflow.inference import CARD_FILE, ModelCard, resolve_device, save_model

log = logging.getLogger("segflow.train")


@dataclass
class TrainResult:
    model_dir: Path
    best_miou: float
    best_epoch: int
    seconds: float
    history: list[dict[str, float]]


def median_frequency_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """SegNet's median frequency balancing: ``median(freq) / freq[c]``, where ``freq[c]`` is the class's pixels
    over the pixels of the images it appears in (classes never seen get weight 1)."""
    class_pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for sample in samples:
        labels = read_mask(sample.mask_path)
        labels = labels[labels != IGNORE_INDEX]
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        class_pixels += counts
        image_pixels[counts > 0] += labels.size
    frequency = class_pixels / np.maximum(image_pixels, 1)
    seen = frequency > 0
    weights = np.ones(num_classes)
    if seen.any():
        weights[seen] = np.median(frequency[seen]) / frequency[seen]
    return torch.tensor(weights, dtype=torch.float32)


def pixel_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels, each weighted by its image's weight (pseudo-labeled images
    get less trust) and, optionally, by its class's weight (normalised like ``F.cross_entropy(weight=...)``)."""
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="none")
    labeled = target != IGNORE_INDEX
    pixel_weight = weight.view(-1, 1, 1) * labeled
    if class_weight is not None:
        pixel_weight = pixel_weight * class_weight[target.where(labeled, 0)]
    return (per_pixel * weight.view(-1, 1, 1)).sum() / pixel_weight.sum().clamp_min(1e-12)


def segmentation_loss(
    output: torch.Tensor | dict[str, torch.Tensor],
    target: torch.Tensor,
    weight: torch.Tensor,
    aux_weight: float,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of any auxiliary head (PSPNet's is 0.4 in the paper)."""
    if isinstance(output, torch.Tensor):
        return pixel_weighted_cross_entropy(output, target, weight, class_weight)
    loss = pixel_weighted_cross_entropy(output["out"], target, weight, class_weight)
    for name, aux_logits in output.items():
        if name != "out":
            loss = loss + aux_weight * pixel_weighted_cross_entropy(aux_logits, target, weight, class_weight)
    return loss


def _optimizer(params: Params, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    cfg = params.train
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train(
    params: Params,
    arch: str,
    *,
    data_dir: Path,
    splits_csv: Path,
    out_dir: Path,
    pseudo_dir: Path | None = None,
    epochs: int | None = None,
    run_name: str | None = None,
) -> TrainResult:
    """Train ``arch`` and write ``out_dir/{model.safetensors, model.json, history.json}`` atomically."""
    cfg = params.train
    epochs = epochs or cfg.epochs
    if arch not in models.available():
        raise SegflowError(f"unknown architecture {arch!r}; available: {', '.join(models.available())}.")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    classes = read_classes(data_dir)

    train_samples = load_samples(data_dir, splits_csv, "train")
    pseudo_count = 0
    if pseudo_dir is not None and cfg.use_pseudo_labels:
        pseudo_samples = load_pseudo_samples(pseudo_dir)
        pseudo_count = len(pseudo_samples)
        train_samples += pseudo_samples
    val_samples = load_samples(data_dir, splits_csv, "val")
    if not train_samples or not val_samples:
        raise SegflowError(f"{splits_csv}: the train and val splits must both hold labeled images.")

    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        SegmentationDataset(train_samples, crop_size=cfg.crop_size, augment=cfg.augment),
        batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_samples) > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda", collate_fn=pad_collate, generator=generator,
        persistent_workers=cfg.num_workers > 0,
    )
    val_loader = DataLoader(
        SegmentationDataset(val_samples), batch_size=params.evaluate.batch_size, num_workers=cfg.num_workers,
        collate_fn=pad_collate,
    )

    options = params.model_options(arch)
    model = models.build(arch, num_classes=len(classes), **options).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = _optimizer(params, model, device)
    total_steps = epochs * len(train_loader)
    schedule = (lambda step: (1 - step / total_steps) ** 0.9) if cfg.lr_schedule == "poly" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = _amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    pseudo_weight = torch.tensor(cfg.pseudo_weight, device=device)
    class_weight = None
    if cfg.class_weighting:  # from the labeled training masks only: pseudo-labels would echo the teacher's bias
        class_weight = median_frequency_weights([s for s in train_samples if not s.pseudo], len(classes)).to(device)

    card = ModelCard(arch=arch, num_classes=len(classes), classes=classes, options=options)
    history: list[dict[str, float]] = []
    best_miou, best_epoch = -math.inf, 0
    started = time.perf_counter()
    with tracking.stage_run(params.mlflow, "train", run_name or arch), atomic_dir(out_dir) as staging:
        mlflow.log_params({
            "arch": arch, "epochs": epochs, "batch_size": cfg.batch_size, "crop_size": cfg.crop_size,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "aux_weight": cfg.aux_weight,
            "device": device.type, "amp": str(amp_dtype), "train_images": len(train_samples) - pseudo_count,
            "pseudo_images": pseudo_count, "pseudo_weight": cfg.pseudo_weight, "val_images": len(val_samples),
            "class_weighting": cfg.class_weighting,
            **{f"model.{k}": v for k, v in options.items()},
        })
        mlflow.set_tag("segflow.arch", arch)
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum = torch.zeros((), device=device)
            bar = tqdm(train_loader, desc=f"{run_name or arch} epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)
            for batch in bar:
                images = batch["image"].to(device, non_blocking=True)
                masks = batch["mask"].to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                weight = torch.where(batch["pseudo"].to(device), pseudo_weight, torch.ones_like(pseudo_weight))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    output = model(images)
                    loss = segmentation_loss(output, masks, weight, cfg.aux_weight, class_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach()
            train_loss = (loss_sum / max(1, len(train_loader))).item()
            if not math.isfinite(train_loss):
                raise SegflowError(f"training {arch} diverged at epoch {epoch} (loss {train_loss}); lower train.lr.")
            val = confusion_over(model, val_loader, len(classes), device).compute()
            record = {
                "epoch": epoch, "train_loss": train_loss, "val_miou": val["miou"],
                "val_pixel_accuracy": val["pixel_accuracy"], "lr": scheduler.get_last_lr()[0],
            }
            history.append(record)
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            log.info("%s epoch %d: loss %.4f, val mIoU %.4f", arch, epoch, train_loss, val["miou"])
            # NaN (no class seen yet) must not leave the run without any checkpoint.
            if epoch == 1 or val["miou"] > best_miou:
                best_miou, best_epoch = val["miou"], epoch
                card.extra = {"best_epoch": epoch, "val_miou": val["miou"]}
                save_model(model, card, staging)
        seconds = time.perf_counter() - started
        # The card goes with the best epoch's weights; the training time is only known now.
        atomic_write_json(staging / CARD_FILE, asdict(replace(card, extra={**card.extra, "train_seconds": seconds})))
        (staging / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        mlflow.log_metrics({"best_val_miou": best_miou, "train_seconds": seconds})
        mlflow.log_artifacts(str(staging), artifact_path="checkpoint")
    return TrainResult(Path(out_dir), best_miou, best_epoch, seconds, history)
