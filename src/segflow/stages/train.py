"""Train one architecture: labeled images (plus pseudo-labeled ones when given), best checkpoint by val mIoU.

The loop follows torchvision's references/segmentation: small functions, one :class:`TrainStep` (also what
``benchmarks/train_throughput.py`` times). On CUDA it runs mixed precision (bf16, or fp16 with a GradScaler),
channels-last, cuDNN autotuning and a fused optimizer, and never waits for the GPU inside an epoch.
Resumable (segflow.training.checkpoint) and data-parallel under torchrun (segflow.training.distributed).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segflow import CARD_FILE, IGNORE_INDEX, WEIGHTS_FILE, models
from segflow.config import ConsistencyParams, LossParams, MlflowParams, TrainParams
from segflow.data.datasets import (
    BatchAugment,
    Sample,
    SegmentationDataset,
    batch_augment_on,
    load_pseudo_samples,
    load_samples,
    pad_collate,
    read_classes,
)
from segflow.data.decoded_cache import CACHE_DIR, open_cache
from segflow.data.fingerprint import file_sha256, folder_sha256, ingested_sha256
from segflow.data.imageio import read_mask
from segflow.data.manifest import read_manifest
from segflow.errors import SegflowError
from segflow.fsutil import atomic_dir, atomic_write_json, exclusive_lock
from segflow.inference.card import EMA_DIR, LAST_DIR, SNAPSHOTS_DIR, ModelCard, read_card
from segflow.inference.metrics import confusion_over
from segflow.inference.predictor import save_model
from segflow.models.names import unknown_architecture
from segflow.models.recipes import Recipe
from segflow.registry import tracking
from segflow.registry.model_source import resolve_model_dir
from segflow.training import checkpoint, distributed
from segflow.training.checkpoint import Progress
from segflow.training.consistency import (
    TargetStatistics,
    UnlabeledViews,
    batchnorm_statistics_frozen,
    consistency_loss,
    consistency_targets,
    sigmoid_rampup,
    unlabeled_batches,
)
from segflow.training.distributed import EpochSampler, ProcessGroup, SeededDataset
from segflow.training.ema import mean_teacher
from segflow.training.losses import DEFAULT_LOSS, segmentation_loss

log = logging.getLogger("segflow.stages.train")


@dataclass
class TrainResult:
    model_dir: Path
    best_miou: float
    best_epoch: int
    seconds: float
    history: list[dict[str, float]]
    steps: int = 0  # optimizer steps taken


def batches_per_rank(images: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch of one process: the last partial batch dropped unless it is the only one."""
    per_rank = -(-images // world_size)
    return per_rank // batch_size if per_rank > batch_size else 1


def mix_labeled_and_pseudo(labeled: list[Sample], pseudo: list[Sample], pseudo_share: float | None) -> list[Sample]:
    """The student's training set: the smaller of the two sets repeated (a whole number of times, at least once)
    until pseudo-labeled images are about ``pseudo_share`` of it, so neither the few true labels (ST++) nor a few
    unlabeled frames of the deployment domain are drowned out; None: every image once."""
    if pseudo_share is None or not labeled or not pseudo:
        return labeled + pseudo
    wanted = pseudo_share / (1 - pseudo_share)  # pseudo-labeled samples per labeled one
    if len(pseudo) < wanted * len(labeled):
        return labeled + pseudo * max(1, round(wanted * len(labeled) / len(pseudo)))
    return labeled * max(1, round(len(pseudo) / (wanted * len(labeled)))) + pseudo


def class_pixels(samples: list[Sample], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: its labeled pixels, and the pixels of the images it appears in (void excluded)."""
    pixels = np.zeros(num_classes)
    image_pixels = np.zeros(num_classes)
    for sample in samples:
        labels = read_mask(sample.mask_path)
        labels = labels[labels != IGNORE_INDEX]
        counts = np.bincount(labels, minlength=num_classes)[:num_classes]
        pixels += counts
        image_pixels[counts > 0] += labels.size
    return pixels, image_pixels


def median_frequency_weights(pixels: np.ndarray, image_pixels: np.ndarray) -> torch.Tensor:
    """SegNet's median frequency balancing: ``median(freq) / freq[c]``, where ``freq[c]`` is the class's pixels
    over the pixels of the images it appears in (classes never seen get weight 1)."""
    frequency = pixels / np.maximum(image_pixels, 1)
    seen = frequency > 0
    weights = np.ones(len(pixels))
    if seen.any():
        weights[seen] = np.median(frequency[seen]) / frequency[seen]
    return torch.tensor(weights, dtype=torch.float32)


def prior_bias(pixels: np.ndarray, class_weight: torch.Tensor | None) -> torch.Tensor:
    """The class scores' offsets whose softmax is the (class-weighted) share of each class's labeled pixels: the
    constant prediction that minimises the loss, so training starts from it (Lin et al. 2017, §4.1). One pixel
    is added to every class, so that a class absent from the training masks gets a finite offset."""
    share = torch.tensor(pixels + 1, dtype=torch.float32)
    if class_weight is not None:
        share = share * class_weight.cpu()
    log_share = (share / share.sum()).log()
    return log_share - log_share.mean()


def unlabeled_class_weight(class_weight: torch.Tensor | None, setting: str) -> torch.Tensor | None:
    """``train.unlabeled_class_weighting``: the labeled loss's class weights on pseudo-labeled and unlabeled
    pixels, their square root, or none."""
    if class_weight is None or setting == "none":
        return None
    return class_weight.sqrt() if setting == "sqrt" else class_weight


BEST_DIR = "best"  # inside the resume folder: the best weights so far survive a kill


def build_optimizer(recipe: Recipe, model: nn.Module, device: torch.device, *,
                    encoder_loaded: bool) -> torch.optim.Optimizer:
    """The recipe's optimizer over parameter groups: a learning-rate factor (new layers over a loaded encoder,
    biases, the model's own ``lr_multipliers``) and weight decay or none (norm weights and biases, when the recipe
    says so)."""
    encoder = model.encoder_module() if encoder_loaded and hasattr(model, "encoder_module") else None
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr_mult = recipe.bias_lr_mult if name.endswith(".bias") else 1.0
        lr_mult *= next((factor for prefix, factor in getattr(model, "lr_multipliers", {}).items()
                         if name.startswith(prefix)), 1.0)
        if encoder is not None and id(parameter) not in encoder_ids:
            lr_mult *= recipe.new_layers_lr_mult
        norm_or_bias = parameter.ndim <= 1  # batch/group/layer norm weights and every bias are vectors
        decay = 0.0 if norm_or_bias and not recipe.norm_bias_decay else recipe.weight_decay
        groups.setdefault((lr_mult, decay), []).append(parameter)
    param_groups = [{"params": params, "lr": recipe.lr * lr_mult, "weight_decay": decay}
                    for (lr_mult, decay), params in groups.items()]
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum, **fused)
    return torch.optim.AdamW(param_groups, lr=recipe.lr, **fused)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly (DeepLab: ``(1 - step / total) ** 0.9``) or constant, after a linear warm-up from a tenth of the
    learning rate when the recipe has one; stepped once per optimizer step, every group scaled alike."""
    warmup = recipe.warmup_steps

    def factor(step: int) -> float:
        decay = (1 - step / total_steps) ** 0.9 if recipe.lr_schedule == "poly" else 1.0
        return decay * (0.1 + 0.9 * step / warmup if step < warmup else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # the largest glibc accepts on 64-bit, and the cap of its adaptive threshold
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory one CPU training step frees for the next step (process-wide).

    A step frees its activations and, at its end, its gradients (``zero_grad(set_to_none=True)``), then allocates
    them again. By default glibc gives the top of its heap back to the OS once more than twice its adaptive mmap
    threshold lies free there: when the freed gradients end up there (it depends on whatever else the process
    allocated, e.g. a second model in benchmarks/train_throughput.py), each backward page-faults all of them in
    again (24k minor faults, ~100 MB, per Unet-ResNet34 step: 10-35% of the step on 2 cores). Fixed thresholds
    (which also switch the adaptive ones off) keep blocks up to 32 MiB on the heap and its top in the process,
    whose resident size then stays at the step's peak, reached every step anyway. Linux/glibc only; elsewhere
    nothing (musl's mallopt is a no-op)."""
    if sys.platform != "linux":
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def tune_process_for_training(device: torch.device) -> None:
    """Process-wide settings for fast training steps on ``device``: on CUDA cuDNN benchmarks its kernels and
    keeps the fastest; on the CPU malloc keeps freed memory for the next step (:func:`keep_freed_memory`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_memory()


def prepare_model(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """On the device; on CUDA channels-last (tensor cores want NHWC)."""
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class CompiledOrEager:
    """``torch.compile(module)``; when compiling fails (no C++ compiler, an unsupported op) one warning, then
    the module runs eagerly. Compilation happens at the first call, so that is where failures show."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(module)
        except Exception as exc:  # noqa: BLE001 - any compiler problem: eager is always correct
            self._give_up(exc)

    def __call__(self, images: torch.Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(images)
            except Exception as exc:  # noqa: BLE001
                self._give_up(exc)
        return self.module(images)

    def _give_up(self, exc: Exception) -> None:
        log.warning("torch.compile failed, training without it (train.compile: false hides this): %s",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.compiled = None


class TrainStep:
    """Forward, loss and backward of one batch, and the optimizer step: the code path of :func:`train`, and
    what ``benchmarks/train_throughput.py`` times. Nothing here waits for the device (the loss stays on it)."""

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        *,
        device: torch.device,
        amp: torch.dtype | None,
        aux_weight: float,
        pseudo_weight: float = 1.0,
        class_weight: torch.Tensor | None = None,
        compile: bool = False,
        batch_augment: BatchAugment | None = None,
        consistency: ConsistencyParams | None = None,
        unlabeled_class_weight: torch.Tensor | None = None,
        ema: AveragedModel | None = None,
        total_steps: int = 0,
        loss: LossParams = DEFAULT_LOSS,
    ) -> None:
        self.network = network  # possibly DistributedDataParallel
        self.model = network.module if isinstance(network, DistributedDataParallel) else network
        self.forward = CompiledOrEager(network) if compile else network
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.device, self.amp = device, amp
        self.aux_weight, self.class_weight, self.loss = aux_weight, class_weight, loss
        self.unlabeled_class_weight = unlabeled_class_weight  # on pseudo-labeled and unlabeled pixels
        self.pseudo_weight = torch.tensor(pseudo_weight, device=device)
        self.batch_augment = batch_augment  # the loader then yields un-augmented uint8 batches
        self.consistency = consistency
        self.ema = ema  # Mean Teacher: predicts the consistency targets (segflow.training.ema)
        self.rampup_steps = (consistency.rampup if consistency is not None else 0) * total_steps
        self.target_statistics: TargetStatistics | None = None  # of the unlabeled targets, from the first batch

    def unlabeled_weight(self) -> float:
        """``consistency.weight``, ramped up over the first ``consistency.rampup`` share of the steps."""
        return self.consistency.weight * sigmoid_rampup(self.scheduler.last_epoch, self.rampup_steps)

    def forward_backward(
        self, batch: dict[str, torch.Tensor], loss_scale: float = 1.0, sync: bool = True,
        unlabeled: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Accumulate the gradients of ``loss_scale`` x the batch loss; returns the (unscaled) loss.

        ``sync=False`` skips the gradient all-reduce under DDP (a batch that is not the last one accumulated).
        An ``unlabeled`` batch (segflow.training.consistency) adds the (ramped-up) ``consistency.weight`` x its consistency
        loss: the targets come from the Mean Teacher (or the model) in eval mode, and the strong views get a
        forward pass of their own that leaves batch norm's running statistics alone."""
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device, non_blocking=True)
        if self.batch_augment is not None:
            images, masks = self.batch_augment(images, masks, batch["size"], batch["augment_draws"])
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        pseudo = batch["pseudo"].to(self.device)
        weight = torch.where(pseudo, self.pseudo_weight, torch.ones_like(self.pseudo_weight))
        skip_sync = not sync and isinstance(self.network, DistributedDataParallel)
        with self.network.no_sync() if skip_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                output = self.forward(images)
                loss = segmentation_loss(output, masks, weight, self.aux_weight, self.class_weight, pseudo,
                                         self.unlabeled_class_weight, self.loss)
                if unlabeled is not None:
                    teacher = self.model if self.ema is None else self.ema.module
                    targets = consistency_targets(teacher, unlabeled, self.consistency, self.device,
                                                  self.class_weight)
                    # The inner model (not a DDP wrapper's second forward): the backward below still all-reduces
                    # every gradient once, through the hooks DDP put on the parameters.
                    with batchnorm_statistics_frozen(self.model):
                        strong_output = self.model(targets.strong.to(images.dtype))
                    strong_logits = strong_output["out"] if isinstance(strong_output, dict) else strong_output
                    if self.target_statistics is None:
                        self.target_statistics = TargetStatistics(strong_logits.shape[1], self.device)
                    self.target_statistics.update(targets)
                    loss = loss + self.unlabeled_weight() * consistency_loss(strong_logits, targets,
                                                                             self.unlabeled_class_weight)
            self.scaler.scale(loss * loss_scale if loss_scale != 1 else loss).backward()
        return loss.detach()

    def unlabeled_target_record(self, classes: list[str]) -> dict[str, float]:
        """How the unlabeled targets since the last call stood (:meth:`TargetStatistics.summary`), then reset."""
        if self.target_statistics is None:
            return {"unlabeled_confident": 0.0}
        return self.target_statistics.summary(classes)

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss


@dataclass(frozen=True)
class EpochPlan:
    """The epochs of one training: their batches (per process), optimizer steps, validations and snapshots."""

    epochs: int
    batches_per_epoch: int
    last_epoch_batches: int  # fewer under the equal budget of pseudo-labeled training
    accumulate: int          # batches per optimizer step (fewer at the end of an epoch)
    val_interval: int
    snapshot_epochs: frozenset[int] = frozenset()

    def batches(self, epoch: int) -> int:
        return self.last_epoch_batches if epoch == self.epochs else self.batches_per_epoch

    def steps(self, epoch: int, batches_done: int) -> int:
        """Optimizer steps taken once ``batches_done`` batches of ``epoch`` are."""
        steps_per_epoch = -(-self.batches_per_epoch // self.accumulate)
        return (epoch - 1) * steps_per_epoch + -(-batches_done // self.accumulate)

    @property
    def total_steps(self) -> int:
        return self.steps(self.epochs, self.last_epoch_batches)

    def validates(self, epoch: int) -> bool:
        # Small training sets make short epochs, where validating and checkpointing each one costs as much as the
        # training itself: train.val_interval spaces them (the last epoch is always validated).
        return epoch % self.val_interval == 0 or epoch == self.epochs


def plan_epochs(cfg: TrainParams, arch: str, data: TrainingData, epochs: int, snapshots: int, world_size: int) -> EpochPlan:
    """``epochs`` of the training data; with pseudo-labeled images the batches (so the optimizer steps)
    labeled-only training would take (equal budget). ``snapshots`` evenly spaced epochs before the last."""
    batches_per_epoch = last_epoch_batches = len(data.train_loader)
    if data.pseudo_count:
        total_batches = epochs * batches_per_rank(len(data.labeled_samples), cfg.batch_size, world_size)
        epochs = -(-total_batches // batches_per_epoch)
        last_epoch_batches = total_batches - (epochs - 1) * batches_per_epoch
        log.info("%s: %d labeled + %d pseudo-labeled images, %d batches: as many as labeled-only training takes",
                 arch, len(data.labeled_samples), data.pseudo_count, total_batches)
    snapshot_epochs = {round(epochs * k / (snapshots + 1)) for k in range(1, snapshots + 1)} - {0, epochs}
    return EpochPlan(epochs, batches_per_epoch, last_epoch_batches, cfg.accumulate_steps, cfg.val_interval,
                     frozenset(snapshot_epochs))


class Checkpointer:
    """Exact resume: restores a training's state and writes it when due (rank 0; every rank hands over its RNG
    states and running loss)."""

    def __init__(self, resume_dir: Path, group: ProcessGroup, settings: dict[str, Any], plan: EpochPlan,
                 every_steps: int | None, **state: Any):
        self.resume_dir, self.group, self.settings = resume_dir, group, settings
        self.plan, self.every_steps = plan, every_steps or 0
        self.state = state  # model, optimizer, scheduler, scaler, ema
        self.started = time.perf_counter()

    def begin(self, resume: bool) -> tuple[Progress, torch.Tensor]:
        """The progress and this rank's running loss to go on from: the checkpoint's with ``resume`` (refused
        under other settings), else fresh ones, any old checkpoint removed."""
        device = self.group.device
        if resume:
            saved = checkpoint.load(self.resume_dir)
            checkpoint.check_settings(saved, self.settings, self.resume_dir)
            checkpoint.restore(saved, rank=self.group.rank, **self.state)
            progress = saved.progress
            loss_sum = checkpoint.of_rank(saved.tensors, self.group.rank)["loss_sum"].to(device)
        else:
            progress, loss_sum = Progress(), torch.zeros((), device=device)
            if self.group.is_main:
                checkpoint.remove(self.resume_dir)
        self.started = time.perf_counter() - progress.seconds
        return progress, loss_sum

    def elapsed(self) -> float:
        """Seconds of training, those before a resume included."""
        return time.perf_counter() - self.started

    def due(self, progress: Progress) -> bool:
        """Whether to checkpoint where ``progress`` stands: at the start of the epoch after a validated one (a
        resumed run replays the epochs since, exactly: the checkpoint holds the RNG states), and inside an
        epoch after every ``train.checkpoint_every_steps``-th optimizer step."""
        if progress.batches_done == 0:
            return progress.epoch > 1 and self.plan.validates(progress.epoch - 1)
        return (self.every_steps > 0 and progress.batches_done < self.plan.batches(progress.epoch)
                and self.plan.steps(progress.epoch, progress.batches_done) % self.every_steps == 0)

    def maybe_save(self, progress: Progress, loss_sum: torch.Tensor) -> None:
        if self.due(progress):
            self.save(progress, loss_sum)

    def save(self, progress: Progress, loss_sum: torch.Tensor) -> None:
        per_rank = distributed.gather_tensors({**checkpoint.rng_state(), "loss_sum": loss_sum}, self.group)
        if self.group.is_main:
            progress.seconds = self.elapsed()
            checkpoint.save(self.resume_dir, progress=progress, settings=self.settings, tensors=per_rank, **self.state)


def train_epoch(
    step: TrainStep, data: TrainingData, plan: EpochPlan, progress: Progress, loss_sum: torch.Tensor,
    checkpointer: Checkpointer, *, unlabeled: Iterator[dict[str, torch.Tensor]] | None, title: str, show: bool,
) -> None:
    """Train on epoch ``progress.epoch`` after its first ``progress.batches_done`` batches, each batch with the
    next ``unlabeled`` one if given: one optimizer step per ``plan.accumulate`` batches, each batch's loss divided
    by their number, summed into ``loss_sum``. ``progress`` follows the optimizer steps, checkpointed when due."""
    epoch, first_batch = progress.epoch, progress.batches_done
    batches = plan.batches(epoch)
    step.model.train()
    data.sampler.set_epoch(epoch, start=first_batch * data.train_loader.batch_size)
    bar = tqdm(itertools.islice(data.train_loader, batches - first_batch), desc=f"{title} epoch {epoch}/{plan.epochs}",
               leave=False, dynamic_ncols=True, initial=first_batch, total=batches, disable=not show)
    for number, batch in enumerate(bar, start=first_batch + 1):
        group_start = (number - 1) // plan.accumulate * plan.accumulate
        group_size = min(plan.accumulate, batches - group_start)
        closes_group = number == group_start + group_size
        loss_sum += step.forward_backward(batch, 1 / group_size, sync=closes_group,
                                          unlabeled=None if unlabeled is None else next(unlabeled))
        if closes_group:
            step.optimizer_step()
            progress.batches_done = number
            checkpointer.maybe_save(progress, loss_sum)


def validate(model: nn.Module, loader: DataLoader, num_classes: int, group: ProcessGroup) -> dict[str, Any]:
    """Scores on the val split; each process holds a share of it, the confusion matrices are summed."""
    confusion = confusion_over(model, loader, num_classes, group.device)
    distributed.all_reduce_sum(confusion.matrix, group)
    return confusion.compute()


def end_of_epoch(
    step: TrainStep, data: TrainingData, plan: EpochPlan, progress: Progress, loss_sum: torch.Tensor,
    checkpointer: Checkpointer, *, arch: str, evaluated: nn.Module, card: ModelCard, splits_csv: Path,
) -> None:
    """After the batches of epoch ``progress.epoch``: its loss, its validation when due (the best model so far
    kept), its record in the history and MLflow, its snapshot when due; then ``progress`` on to the next epoch,
    checkpointed when due."""
    group, epoch = checkpointer.group, progress.epoch
    distributed.all_reduce_sum(loss_sum, group)
    train_loss = (loss_sum / max(1, plan.batches(epoch) * group.world_size)).item()
    if not math.isfinite(train_loss):
        raise SegflowError(f"training {arch} diverged at epoch {epoch} (loss {train_loss}); lower the learning rate "
                           f"(train.lr, or models.{arch}.recipe.lr).")
    record = {"epoch": epoch, "train_loss": train_loss, "lr": step.scheduler.get_last_lr()[0]}
    if data.unlabeled_loader is not None:  # this rank's share: how much of the unlabeled images teaches, how well
        record |= step.unlabeled_target_record(card.classes)
    validating, improved = plan.validates(epoch), False
    if validating:
        val = validate(evaluated, data.val_loader, card.num_classes, group)
        if not math.isfinite(val["miou"]):  # NaN only when no val pixel is labeled: no model can be picked
            raise SegflowError(
                f"val mIoU is undefined: the val split of {splits_csv} has no labeled pixels (every mask "
                "pixel is ignore, 255), so no epoch of training can be chosen. Label some of its images, or "
                "re-run the validate stage (validate.min_labeled_pixel_fraction) and the split stage.")
        record |= {"val_miou": val["miou"], "val_pixel_accuracy": val["pixel_accuracy"]}
        improved = progress.best_epoch == 0 or val["miou"] > progress.best_miou
        if improved:
            progress.best_miou, progress.best_epoch = val["miou"], epoch
    progress.history.append(record)  # every epoch's loss; val_miou on validated epochs only
    if group.is_main:
        mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        if validating:
            log.info("%s epoch %d: loss %.4f, val mIoU %.4f", arch, epoch, train_loss, val["miou"])
        if epoch in plan.snapshot_epochs:
            save_model(evaluated, replace(card, extra={"epoch": epoch}),
                       checkpointer.resume_dir / SNAPSHOTS_DIR / f"epoch_{epoch}")
        if improved:
            save_model(evaluated, card, checkpointer.resume_dir / BEST_DIR)
    progress.epoch, progress.batches_done = epoch + 1, 0
    loss_sum.zero_()
    checkpointer.maybe_save(progress, loss_sum)


def train(
    cfg: TrainParams,
    arch: str,
    *,
    model_options: dict[str, Any],
    mlflow_cfg: MlflowParams,
    val_batch_size: int,
    reliable_fraction: float = 1.0,
    data_dir: Path,
    splits_csv: Path,
    out_dir: Path,
    pseudo_dir: Path | None = None,
    epochs: int | None = None,
    run_name: str | None = None,
    snapshots: int = 0,
    resume: bool = False,
    cache_dir: Path = CACHE_DIR,
    init_from: Path | None = None,
    keep_last: bool = False,
) -> TrainResult:
    """Train ``arch`` and write ``out_dir/{model.safetensors, model.json, history.json}`` atomically.

    ``snapshots`` earlier, evenly spaced epochs are also kept in ``out_dir/snapshots/epoch_N`` (model folders):
    the pseudo-label stage ranks images by how much those checkpoints agree with the final model (ST++).

    A checkpoint for exact resumption is kept in ``models/.NAME.resume`` (segflow.training.checkpoint) while training
    runs; ``resume`` continues from it, a plain run starts over. Under torchrun every process calls this;
    ``train.batch_size`` is per process and rank 0 alone logs and writes (segflow.training.distributed).
    With ``train.decoded_cache`` images come from the cache in ``cache_dir`` (segflow.stages.cache), built from
    ``data_dir``. ``init_from`` (a model folder of the same architecture and classes) gives the starting weights.
    ``keep_last`` also keeps the final weights in ``out_dir/last`` when val picked an earlier epoch.
    ``model_options`` are the builder's (params.yaml ``models.ARCH``), ``val_batch_size`` the validation's
    (``evaluate.batch_size``), ``reliable_fraction`` the share of pseudo-labeled images trained on
    (``pseudo_label.reliable_fraction``, with ``pseudo_dir`` only).
    """
    if (problem := unknown_architecture(arch)) is not None:
        raise SegflowError(f"{problem}.")
    # One training per model folder (torchrun's ranks are one training: rank 0 holds the lock for them all).
    lock = (exclusive_lock(checkpoint.lock_path_for(out_dir), f"a training of {out_dir}")
            if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext())
    with lock:
        group = distributed.setup(cfg.device)
        try:
            # Process-wide: the global RNG (the model's initial weights, dropout) and the backends' settings.
            torch.manual_seed(cfg.seed)
            tune_process_for_training(group.device)
            source = init_from if init_from is not None else cfg.init_from
            with contextlib.ExitStack() as stack:  # a registered model is downloaded for as long as training runs
                local = None if source is None else stack.enter_context(resolve_model_dir(source))
                other = None if init_from is not None or local is None else read_card(local).arch
                if other not in (None, arch):
                    # train.init_from names one model (the champion, say): the other architectures start afresh.
                    log.warning("%s: train.init_from %s is a %s model; %s starts from its initialisation", arch,
                                source, other, arch)
                    source = local = None
                return _train(cfg, arch, group, options=dict(model_options), reliable_fraction=reliable_fraction,
                              val_batch_size=val_batch_size, mlflow_params=mlflow_cfg,
                              data_dir=data_dir, splits_csv=splits_csv, out_dir=Path(out_dir), pseudo_dir=pseudo_dir,
                              epochs=epochs or cfg.epochs, run_name=run_name or arch, snapshots=snapshots,
                              resume=resume, cache_dir=cache_dir, init_from=local,
                              init_source=None if source is None else str(source), keep_last=keep_last)
        finally:
            distributed.teardown(group)


def load_initial_weights(network: nn.Module, arch: str, classes: list[str], model_dir: Path) -> list[str]:
    """Start from a trained model's weights (a warm start, or a self-training student fine-tuning its teacher).

    The architecture must be the same, and every tensor must fit, except the class-sized ones of the head when
    the classes differ: those keep their fresh initialisation, and their names are returned."""
    card = read_card(model_dir)
    if card.arch != arch:
        raise SegflowError(f"{model_dir}: cannot start {arch} from this {card.arch} model; train.init_from must be "
                           f"a model of the same architecture.")
    if card.classes != classes and card.num_classes == len(classes):
        raise SegflowError(f"{model_dir}: its classes {card.classes} are not these {classes}, yet as many: its head "
                           "cannot be told from the rest; give a model of these classes, or none.")
    try:
        state, own = load_file(str(Path(model_dir) / WEIGHTS_FILE)), network.state_dict()
    except (SafetensorError, OSError) as exc:
        raise SegflowError(f"{model_dir}: cannot read its weights ({exc}).") from None

    def head_of_other_classes(key: str) -> bool:  # the class dimension(s) alone differ
        old, new = tuple(state[key].shape), tuple(own[key].shape)
        return len(old) == len(new) and old != new and all(
            a == b or (a, b) == (card.num_classes, len(classes)) for a, b in zip(old, new))

    mismatched = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    reinitialised = [k for k in mismatched if head_of_other_classes(k)]
    problems = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
                "of another shape": [k for k in mismatched if k not in reinitialised]}
    if any(problems.values()):
        listed = "; ".join(f"{label}: {', '.join(keys[:5])}{' and more' if len(keys) > 5 else ''}"
                           for label, keys in problems.items() if keys)
        raise SegflowError(f"{model_dir}: its weights do not fit {arch} with the options of params.yaml's "
                           f"models.{arch} ({listed}); the options must be the model's: {card.options}.")
    network.load_state_dict({**state, **{k: own[k] for k in reinitialised}})
    if reinitialised:
        log.info("%s: started from %s; its %d classes are not these %d, so the head starts afresh: %s", arch,
                 model_dir, card.num_classes, len(classes), ", ".join(reinitialised))
    return reinitialised


@dataclass
class TrainingData:
    labeled_samples: list[Sample]
    pseudo_count: int
    train_count: int        # labeled + pseudo-labeled, the smaller set repeated (train.pseudo_share)
    val_count: int
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader  # this rank's share of the val images
    unlabeled_count: int = 0
    unlabeled_loader: DataLoader | None = None  # with train.consistency: weak and strong views (segflow.training.consistency)


def _training_data(
    cfg: TrainParams, group: ProcessGroup, *, data_dir: Path, splits_csv: Path, pseudo_dir: Path | None,
    reliable_fraction: float, val_batch_size: int, cache_dir: Path, batch_augment: bool,
) -> TrainingData:
    """The samples and the loaders of one training: labeled + pseudo-labeled images (the ``reliable_fraction``
    of them) in a per-epoch seeded order split across ranks (segflow.training.distributed), val images split across
    ranks, and with ``train.consistency`` the unlabeled images' views, in their own seeded order."""
    labeled_samples = load_samples(data_dir, splits_csv, "train")
    pseudo_samples = []
    if pseudo_dir is not None:  # the caller decided (train.use_pseudo_labels, segflow.training.semi_supervised)
        pseudo_samples = load_pseudo_samples(pseudo_dir, reliable_fraction)
    train_samples = mix_labeled_and_pseudo(labeled_samples, pseudo_samples, cfg.pseudo_share)
    val_samples = load_samples(data_dir, splits_csv, "val")
    if not labeled_samples or not val_samples:
        raise SegflowError(f"{splits_csv}: the train and val splits must both hold labeled images.")
    _check_crop_size(cfg, data_dir, labeled_samples)

    cache = open_cache(cache_dir, data_dir) if cfg.decoded_cache else None
    sampler = EpochSampler(len(train_samples), seed=cfg.seed, rank=group.rank, world_size=group.world_size)
    train_loader = DataLoader(
        SeededDataset(SegmentationDataset(train_samples, crop_size=cfg.crop_size, augment=cfg.augment,
                                          strong_augment=cfg.pseudo_augment, cache=cache, batch_augment=batch_augment)),
        batch_size=cfg.batch_size, sampler=sampler, drop_last=sampler.per_rank > cfg.batch_size,
        num_workers=cfg.num_workers, pin_memory=group.device.type == "cuda", collate_fn=pad_collate,
        # Worker base seeds come from here, not from the global RNG the checkpoint restores (and SeededDataset
        # makes them irrelevant to the data anyway).
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0,
    )
    val_loader = DataLoader(
        SegmentationDataset(val_samples[group.rank :: group.world_size], cache=cache),
        batch_size=val_batch_size,
        num_workers=cfg.num_workers, collate_fn=pad_collate,
    )
    data = TrainingData(labeled_samples, len(pseudo_samples), len(train_samples), len(val_samples), sampler,
                        train_loader, val_loader)
    if cfg.consistency.weight > 0:
        unlabeled_samples = load_samples(data_dir, splits_csv, "unlabeled")
        if not unlabeled_samples:
            log.warning("train.consistency.weight is %g but %s holds no unlabeled images: labeled images only.",
                        cfg.consistency.weight, splits_csv)
            return data
        # Its own seed: the labeled image at the same position must not share the unlabeled one's draws.
        unlabeled_sampler = EpochSampler(len(unlabeled_samples), seed=cfg.seed + 1, rank=group.rank,
                                         world_size=group.world_size)
        data.unlabeled_count = len(unlabeled_samples)
        data.unlabeled_loader = DataLoader(
            SeededDataset(UnlabeledViews(unlabeled_samples, crop_size=cfg.crop_size, augment=cfg.augment,
                                         strong=cfg.pseudo_augment, cutmix=cfg.consistency.cutmix, cache=cache)),
            batch_size=cfg.batch_size, sampler=unlabeled_sampler,
            drop_last=unlabeled_sampler.per_rank >= cfg.batch_size, num_workers=cfg.num_workers,
            pin_memory=group.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + 1),
            persistent_workers=cfg.num_workers > 0,
        )
    return data


def _check_crop_size(cfg: TrainParams, data_dir: Path, samples: list[Sample]) -> None:
    """A crop larger than every (scaled) training image is only padding: memory for nothing (4096 px crops of
    small images got the process killed by the kernel)."""
    sizes = read_manifest(data_dir).set_index("image_id").loc[[s.image_id for s in samples], ["width", "height"]]
    largest = math.ceil(int(sizes.astype(int).to_numpy().max()) * cfg.augment.scale_max)
    if cfg.crop_size > largest:
        raise SegflowError(
            f"train.crop_size {cfg.crop_size} is larger than every training image, even scaled by "
            f"train.augment.scale_max ({largest} px at most): the crops would hold only padding beyond that. "
            f"Set train.crop_size to at most {largest}.")


def _train(
    cfg: TrainParams, arch: str, group: ProcessGroup, *, options: dict[str, Any], reliable_fraction: float,
    val_batch_size: int, mlflow_params: MlflowParams, data_dir: Path, splits_csv: Path, out_dir: Path,
    pseudo_dir: Path | None, epochs: int, run_name: str, snapshots: int, resume: bool, cache_dir: Path,
    init_from: Path | None, init_source: str | None, keep_last: bool,
) -> TrainResult:
    """One process's training: set-up, the epochs, then the model folder (rank 0)."""
    device = group.device
    recipe = models.recipe(arch, cfg.overrides(), options.pop("recipe", {}))
    classes = read_classes(data_dir)
    batch_augment = BatchAugment(cfg.augment, cfg.crop_size) if batch_augment_on(cfg.batch_augment, device) else None
    data = _training_data(cfg, group, data_dir=data_dir, splits_csv=splits_csv, pseudo_dir=pseudo_dir,
                          reliable_fraction=reliable_fraction, val_batch_size=val_batch_size, cache_dir=cache_dir,
                          batch_augment=batch_augment is not None)
    plan = plan_epochs(cfg, arch, data, epochs, snapshots, group.world_size)

    model, network, reinitialised = _build_model(arch, classes, options, group, sync_batchnorm=cfg.sync_batchnorm,
                                                 init_from=init_from)
    optimizer = build_optimizer(recipe, model, device, encoder_loaded=options.get("encoder_weights") is not None)
    scheduler = build_scheduler(recipe, optimizer, plan.total_steps)
    amp = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # Class statistics from the labeled training masks only: pseudo-labels would echo the teacher's bias. A warm
    # start keeps its head's bias; a resumed training loads its checkpoint over the prior.
    prior_init = cfg.prior_init and (init_from is None or bool(reinitialised))
    class_weight, prior_layer = None, None
    if cfg.class_weighting or prior_init:
        pixels, image_pixels = class_pixels(data.labeled_samples, len(classes))
        if cfg.class_weighting:
            class_weight = (median_frequency_weights(pixels, image_pixels) ** cfg.class_weight_power).to(device)
    if prior_init:
        prior_layer = models.init_output_bias(model, prior_bias(pixels, class_weight).to(device))
        log.info("%s: %s", arch, f"{prior_layer}.bias starts at the class prior" if prior_layer else
                 "no layer's bias reaches the class scores unchanged; train.prior_init does not apply")
    ema = mean_teacher(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    # What is validated, kept and registered: the Mean Teacher's weights or the trained ones.
    evaluated = ema.module if ema is not None and cfg.ema.evaluate else model
    step = TrainStep(network, optimizer, scheduler, scaler, device=device, amp=amp, aux_weight=recipe.aux_weight,
                     pseudo_weight=cfg.pseudo_weight, class_weight=class_weight, compile=cfg.compile,
                     batch_augment=batch_augment, consistency=cfg.consistency,
                     unlabeled_class_weight=unlabeled_class_weight(class_weight, cfg.unlabeled_class_weighting),
                     ema=ema, total_steps=plan.total_steps, loss=cfg.loss)
    # The class weights go with the model: pseudo-labeling undoes the bias they give its probabilities.
    card = ModelCard(arch=arch, num_classes=len(classes), classes=classes, options=options,
                     extra={"recipe": recipe.describe(models.describe(arch).aux),
                            **({} if init_source is None else {"init_from": init_source, "reinitialised": reinitialised}),
                            **({} if class_weight is None else {"class_weight": class_weight.tolist()}),
                            **({} if prior_layer is None else {"prior_init": f"{prior_layer}.bias"})})

    resume_dir = checkpoint.resume_dir_for(out_dir)
    settings = _resume_settings(cfg, recipe, arch, plan.epochs, options, group, init_source, batch_augment is not None,
                                reliable_fraction=reliable_fraction, val_batch_size=val_batch_size,
                                data_dir=data_dir, splits_csv=splits_csv, pseudo_dir=pseudo_dir)
    checkpointer = Checkpointer(resume_dir, group, settings, plan, cfg.checkpoint_every_steps, model=model,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
    progress, loss_sum = checkpointer.begin(resume)

    run = tracking.stage_run(mlflow_params, "train", run_name, run_id=progress.run_id) if group.is_main \
        else contextlib.nullcontext()
    with run as active:
        if group.is_main and progress.run_id is None:
            progress.run_id = active.info.run_id
            mlflow.log_params(_run_params(cfg, recipe, arch, plan.epochs, group, amp, data, options))
            mlflow.set_tag("segflow.arch", arch)
            tracking.log_dataset(data_dir, splits_csv, classes)
        unlabeled = None if data.unlabeled_loader is None else unlabeled_batches(
            data.unlabeled_loader, (progress.epoch - 1) * plan.batches_per_epoch + progress.batches_done)

        while progress.epoch <= plan.epochs:  # end_of_epoch moves progress on
            train_epoch(step, data, plan, progress, loss_sum, checkpointer, unlabeled=unlabeled, title=run_name,
                        show=group.is_main)
            end_of_epoch(step, data, plan, progress, loss_sum, checkpointer, arch=arch, evaluated=evaluated,
                         card=card, splits_csv=splits_csv)

        seconds = checkpointer.elapsed()
        if group.is_main:
            if ema is not None and evaluated is not ema.module:  # the Mean Teacher still makes the pseudo-labels
                save_model(ema.module, card, resume_dir / EMA_DIR)
            if keep_last and progress.best_epoch != plan.epochs:  # the final weights beside the best (MMSeg's latest)
                save_model(evaluated, replace(card, extra={"epoch": plan.epochs}), resume_dir / LAST_DIR)
            _write_model_dir(out_dir, resume_dir, card, progress, seconds)
            mlflow.log_metrics({"best_val_miou": progress.best_miou, "train_seconds": seconds})
            mlflow.log_artifacts(str(out_dir), artifact_path="checkpoint")
            checkpoint.remove(resume_dir)
    distributed.barrier(group)
    return TrainResult(out_dir, progress.best_miou, progress.best_epoch, seconds, progress.history,
                       scheduler.last_epoch)


def _build_model(
    arch: str, classes: list[str], options: dict[str, Any], group: ProcessGroup, *, sync_batchnorm: bool,
    init_from: Path | None,
) -> tuple[nn.Module, nn.Module, list[str]]:
    """The model on the training device, what the training step calls (the model itself, or its
    DistributedDataParallel wrapper under torchrun), and the tensors a warm start re-initialised."""
    network = models.build(arch, num_classes=len(classes), **options)
    reinitialised = [] if init_from is None else load_initial_weights(network, arch, classes, init_from)
    device = group.device
    # PyTorch's SyncBatchNorm runs on CUDA only: CPU processes (gloo) keep their own batch statistics.
    model = prepare_model(network, device, sync_batchnorm=group.distributed and sync_batchnorm and device.type == "cuda")
    if not group.distributed:
        return model, model, reinitialised
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp, reinitialised


def _resume_settings(
    cfg: TrainParams, recipe: Recipe, arch: str, epochs: int, options: dict[str, Any], group: ProcessGroup,
    init_from: str | None, batch_augment: bool, *, reliable_fraction: float, val_batch_size: int,
    data_dir: Path, splits_csv: Path, pseudo_dir: Path | None,
) -> dict[str, Any]:
    """What a resumed training must share with the interrupted one to continue it exactly: its parameters and
    the SHA-256 of every file it reads (the ingested data, the split, the pseudo-labels)."""
    return {
        "arch": arch, "epochs": epochs, "model_options": options,
        "processes": group.world_size, "init_from": init_from,
        **{f"recipe.{key}": value for key, value in recipe.settings().items()},
        # Settings that change neither the numbers nor the order may differ when resuming.
        **{f"train.{key}": value for key, value in cfg.model_dump(mode="json").items()
           if key not in ("num_workers", "device", "checkpoint_every_steps", "compile", "decoded_cache", "archs")},
        "train.batch_augment": batch_augment,  # what auto became: it differs between devices
        "pseudo_label.reliable_fraction": reliable_fraction,
        "evaluate.batch_size": val_batch_size,
        f"{splits_csv} (SHA-256)": file_sha256(splits_csv),
        f"{data_dir} (SHA-256 of each file)": ingested_sha256(data_dir),
        **({} if pseudo_dir is None else {f"{pseudo_dir} (SHA-256 of each file)": folder_sha256(pseudo_dir)}),
    }


def _run_params(
    cfg: TrainParams, recipe: Recipe, arch: str, epochs: int, group: ProcessGroup, amp: torch.dtype | None, data: TrainingData,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The training's parameters as the MLflow run records them."""
    return {
        "arch": arch, "epochs": epochs, "batch_size": cfg.batch_size, "crop_size": cfg.crop_size,
        **recipe.settings(), "recipe_source": recipe.source[:500], "device": group.device.type, "amp": str(amp),
        **{f"loss.{key}": value for key, value in cfg.loss.model_dump().items()},
        "processes": group.world_size, "accumulate_steps": cfg.accumulate_steps,
        "global_batch_size": cfg.batch_size * cfg.accumulate_steps * group.world_size,
        "train_images": len(data.labeled_samples), "pseudo_images": data.pseudo_count,
        "pseudo_weight": cfg.pseudo_weight, "val_images": data.val_count,
        "class_weighting": cfg.class_weighting, "class_weight_power": cfg.class_weight_power,
        "prior_init": cfg.prior_init, "unlabeled_images": data.unlabeled_count,
        "unlabeled_class_weighting": cfg.unlabeled_class_weighting, "ema_decay": cfg.ema.decay,
        "ema_evaluated": cfg.ema.decay > 0 and cfg.ema.evaluate,
        **({"consistency_weight": cfg.consistency.weight, "consistency_threshold": cfg.consistency.threshold,
            "consistency_cutmix": cfg.consistency.cutmix, "consistency_rampup": cfg.consistency.rampup}
           if data.unlabeled_loader is not None else {}),
        **{f"model.{k}": v for k, v in options.items()},
    }


def _write_model_dir(out_dir: Path, resume_dir: Path, card: ModelCard, progress: Progress, seconds: float) -> None:
    """The model folder, whole: the best epoch's weights, its card, the history and any snapshots."""
    with atomic_dir(out_dir) as staging:
        shutil.copyfile(resume_dir / BEST_DIR / WEIGHTS_FILE, staging / WEIGHTS_FILE)
        extra = {**card.extra, "best_epoch": progress.best_epoch, "val_miou": progress.best_miou, "train_seconds": seconds,
                 tracking.TRAINING_RUN_KEY: progress.run_id}
        atomic_write_json(staging / CARD_FILE, asdict(replace(card, extra=extra)))
        (staging / "history.json").write_text(json.dumps(progress.history, indent=2) + "\n")
        for folder in (SNAPSHOTS_DIR, EMA_DIR, LAST_DIR):
            if (resume_dir / folder).is_dir():
                shutil.copytree(resume_dir / folder, staging / folder)
