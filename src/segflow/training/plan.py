"""The epochs of one training: batches per process, optimizer steps, validations and snapshots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from segflow.config import TrainParams
from segflow.training.loaders import TrainingData

log = logging.getLogger(__name__)


def batches_per_rank(images: int, batch_size: int, world_size: int) -> int:
    """Batches per epoch of one process: the last partial batch dropped unless it is the only one."""
    per_rank = -(-images // world_size)
    return per_rank // batch_size if per_rank > batch_size else 1


@dataclass
class Progress:
    """Where training stands: ``batches_done`` loader batches of ``epoch`` are behind it (0: epoch not begun)."""

    epoch: int = 1
    batches_done: int = 0
    best_miou: float | None = None
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    seconds: float = 0.0   # training time of the earlier (killed) sessions


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


def validations_since_best(progress: Progress) -> int:
    """Validated epochs after the best one so far."""
    return sum(1 for record in progress.history if "val_miou" in record and record["epoch"] > progress.best_epoch)


def patience_ran_out(patience: int | None, progress: Progress) -> bool:
    """``train.patience`` validations have passed without a better val mIoU (a decision taken from the history
    alone, so a resumed training takes it at the same epoch)."""
    return patience is not None and validations_since_best(progress) >= patience


def training_end(progress: Progress, plan: EpochPlan, patience: int | None) -> dict:
    """How the training ended, for its card: its last epoch, the most it could train, why it stopped
    (``patience``: early stopping; ``epochs``: train.epochs reached) and whether its last validation was its best
    (then it was still improving: more epochs would likely help)."""
    last = progress.history[-1]["epoch"] if progress.history else 0
    return {"epoch": last, "max_epochs": plan.epochs,
            "reason": "patience" if last < plan.epochs else "epochs", "patience": patience,
            "still_improving": progress.best_epoch == last and last > 0}
