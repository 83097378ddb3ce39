"""One training's loop: the step (forward, loss, backward, optimizer), an epoch of them, and the end of an epoch."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segflow.config import ConsistencyParams
from segflow.data.datasets import (
    BatchAugment,
)
from segflow.errors import SegflowError
from segflow.inference.card import SNAPSHOTS_DIR, ModelCard
from segflow.inference.metrics import confusion_over
from segflow.inference.predictor import save_model
from segflow.training import distributed
from segflow.training.checkpoint import BEST_DIR, Checkpointer
from segflow.training.consistency import (
    TargetStatistics,
    batchnorm_statistics_frozen,
    consistency_loss,
    consistency_targets,
    sigmoid_rampup,
)
from segflow.training.distributed import ProcessGroup
from segflow.training.loaders import TrainingData
from segflow.training.losses import LossWeighting, segmentation_loss
from segflow.training.optim import Optimization
from segflow.training.plan import EpochPlan, Progress
from segflow.training.runtime import CompiledOrEager

log = logging.getLogger(__name__)


class TrainStep:
    """Forward, loss and backward of one batch, and the optimizer step: the code path of :func:`train`, and
    what ``benchmarks/train_throughput.py`` times. Nothing here waits for the device (the loss stays on it)."""

    def __init__(
        self,
        network: nn.Module,
        optimization: Optimization,
        weighting: LossWeighting,
        *,
        device: torch.device,
        compile: bool = False,
        batch_augment: BatchAugment | None = None,
        consistency: ConsistencyParams | None = None,
        ema: AveragedModel | None = None,
        total_steps: int = 0,
    ) -> None:
        self.network = network  # possibly DistributedDataParallel
        self.model = network.module if isinstance(network, DistributedDataParallel) else network
        self.forward = CompiledOrEager(network) if compile else network
        self.optimizer, self.scheduler, self.scaler = optimization.optimizer, optimization.scheduler, optimization.scaler
        self.device, self.amp, self.weighting = device, optimization.amp, weighting
        self.pseudo_weight = torch.tensor(weighting.pseudo_weight, device=device)
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
        w = self.weighting
        skip_sync = not sync and isinstance(self.network, DistributedDataParallel)
        with self.network.no_sync() if skip_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                output = self.forward(images)
                loss = segmentation_loss(output, masks, weight, w.aux_weight, w.class_weight, pseudo,
                                         w.unlabeled_class_weight, w.loss)
                if unlabeled is not None:
                    teacher = self.model if self.ema is None else self.ema.module
                    targets = consistency_targets(teacher, unlabeled, self.consistency, self.device, w.class_weight)
                    # The inner model (not a DDP wrapper's second forward): the backward below still all-reduces
                    # every gradient once, through the hooks DDP put on the parameters.
                    with batchnorm_statistics_frozen(self.model):
                        strong_output = self.model(targets.strong.to(images.dtype))
                    strong_logits = strong_output["out"] if isinstance(strong_output, dict) else strong_output
                    if self.target_statistics is None:
                        self.target_statistics = TargetStatistics(strong_logits.shape[1], self.device)
                    self.target_statistics.update(targets)
                    loss = loss + self.unlabeled_weight() * consistency_loss(strong_logits, targets,
                                                                             w.unlabeled_class_weight)
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


def score_val(model: nn.Module, loader: DataLoader, num_classes: int, group: ProcessGroup) -> dict[str, Any]:
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
        val = score_val(evaluated, data.val_loader, card.num_classes, group)
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
