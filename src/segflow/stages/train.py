"""The train stage: one architecture on the labeled images (plus pseudo-labeled ones when given), the best
checkpoint by val mIoU kept as its model folder.

The loop follows torchvision's references/segmentation and lives in segflow.training (loop, plan, loaders,
optim, class_balance, runtime, checkpoint); this module sets one training up from params.yaml's sections and a
:class:`TrainRun`, runs its epochs under an MLflow run and writes the model folder. Resumable
(segflow.training.checkpoint) and data-parallel under torchrun (segflow.training.distributed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from segflow import CARD_FILE, WEIGHTS_FILE, models
from segflow.config import MlflowParams, TrainParams
from segflow.data.datasets import BatchAugment, batch_augment_on, read_classes
from segflow.data.decoded_cache import CACHE_DIR
from segflow.data.fingerprint import file_sha256, folder_sha256, ingested_sha256
from segflow.errors import SegflowError
from segflow.fsutil import atomic_dir, atomic_write_json, exclusive_lock
from segflow.inference.card import EMA_DIR, LAST_DIR, SNAPSHOTS_DIR, ModelCard, read_card
from segflow.inference.predictor import save_model
from segflow.models.names import unknown_architecture
from segflow.models.recipes import Recipe, split_model_options
from segflow.registry import tracking
from segflow.registry.model_source import resolve_model_dir
from segflow.training import checkpoint, distributed
from segflow.training.checkpoint import BEST_DIR, Checkpointer
from segflow.training.class_balance import class_balance, unlabeled_class_weight
from segflow.training.consistency import unlabeled_batches
from segflow.training.distributed import ProcessGroup
from segflow.training.ema import mean_teacher
from segflow.training.loaders import TrainingData, training_data
from segflow.training.loop import TrainStep, end_of_epoch, train_epoch
from segflow.training.losses import LossWeighting
from segflow.training.optim import build_optimization
from segflow.training.plan import EpochPlan, Progress, patience_ran_out, plan_epochs, training_end
from segflow.training.runtime import build_network, tune_process_for_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRun:
    """Where one training reads and writes, and how this run goes (the params sections it reads come beside)."""

    data_dir: Path
    splits_csv: Path
    out_dir: Path
    pseudo_dir: Path | None = None  # pseudo-labels to train on (the caller decided: segflow.training.semi_supervised)
    cache_dir: Path = CACHE_DIR     # the decoded-image cache (train.decoded_cache), built from data_dir
    epochs: int | None = None       # None: train.epochs
    name: str | None = None         # the MLflow run's name; None: the architecture's
    snapshots: int = 0              # earlier, evenly spaced epochs also kept in out_dir/snapshots/epoch_N (ST++)
    resume: bool = False            # continue from the checkpoint in models/.NAME.resume; else start over
    init_from: Path | None = None   # a model folder of the same architecture: the starting weights
    keep_last: bool = False         # the final weights also in out_dir/last when val picked an earlier epoch


@dataclass
class TrainResult:
    model_dir: Path
    best_miou: float
    best_epoch: int
    seconds: float
    history: list[dict[str, float]]
    steps: int = 0  # optimizer steps taken


@dataclass
class Training:
    """One process's training, set up: what its epochs run and what its model folder gets."""

    recipe: Recipe
    data: TrainingData
    plan: EpochPlan
    step: TrainStep
    evaluated: nn.Module  # validated, kept and registered: the Mean Teacher's weights or the trained ones
    card: ModelCard


def train(cfg: TrainParams, arch: str, run: TrainRun, *, model_options: dict[str, Any], mlflow_cfg: MlflowParams,
          val_batch_size: int, reliable_fraction: float = 1.0) -> TrainResult:
    """Train ``arch`` as ``run`` says and write ``run.out_dir/{model.safetensors, model.json, history.json}``
    atomically (snapshots, the Mean Teacher and the last weights beside them when asked).

    A checkpoint for exact resumption is kept in ``models/.NAME.resume`` (segflow.training.checkpoint) while
    training runs. Under torchrun every process calls this; ``train.batch_size`` is per process and rank 0 alone
    logs and writes (segflow.training.distributed). ``model_options`` are params.yaml's ``models.ARCH``,
    ``val_batch_size`` the validation's (``evaluate.batch_size``), ``reliable_fraction`` the share of
    pseudo-labeled images trained on (``pseudo_label.reliable_fraction``, with ``run.pseudo_dir`` only).
    """
    if (problem := unknown_architecture(arch)) is not None:
        raise SegflowError(f"{problem}.")
    # One training per model folder (torchrun's ranks are one training: rank 0 holds the lock for them all).
    lock = (exclusive_lock(checkpoint.lock_path_for(run.out_dir), f"a training of {run.out_dir}")
            if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext())
    with lock:
        group = distributed.setup(cfg.device)
        try:
            # Process-wide: the global RNG (the model's initial weights, dropout) and the backends' settings.
            torch.manual_seed(cfg.seed)
            tune_process_for_training(group.device)
            source = run.init_from if run.init_from is not None else cfg.init_from
            with contextlib.ExitStack() as stack:  # a registered model is downloaded for as long as training runs
                local = None if source is None else stack.enter_context(resolve_model_dir(source))
                other = None if run.init_from is not None or local is None else read_card(local).arch
                if other not in (None, arch):
                    # train.init_from names one model (the champion, say): the other architectures start afresh.
                    log.warning("%s: train.init_from %s is a %s model; %s starts from its initialisation", arch,
                                source, other, arch)
                    source = local = None
                run = replace(run, out_dir=Path(run.out_dir), epochs=run.epochs or cfg.epochs, name=run.name or arch,
                              init_from=local)
                builder_options, recipe_overrides = split_model_options(model_options)
                training = _set_up(cfg, arch, group, run, builder_options, models.recipe(
                    arch, cfg.overrides(), recipe_overrides), reliable_fraction=reliable_fraction,
                    val_batch_size=val_batch_size, init_source=None if source is None else str(source))
                return _train(cfg, arch, group, run, training, mlflow_cfg, reliable_fraction=reliable_fraction,
                              val_batch_size=val_batch_size)
        finally:
            distributed.teardown(group)


def _set_up(cfg: TrainParams, arch: str, group: ProcessGroup, run: TrainRun, options: dict[str, Any], recipe: Recipe,
            *, reliable_fraction: float, val_batch_size: int, init_source: str | None) -> Training:
    """The data, the epochs, the model and its training step, and the card its folder will carry."""
    device = group.device
    classes = read_classes(run.data_dir)
    batch_augment = BatchAugment(cfg.augment, cfg.crop_size) if batch_augment_on(cfg.batch_augment, device) else None
    data = training_data(cfg, group, data_dir=run.data_dir, splits_csv=run.splits_csv, pseudo_dir=run.pseudo_dir,
                         reliable_fraction=reliable_fraction, val_batch_size=val_batch_size, cache_dir=run.cache_dir,
                         batch_augment=batch_augment is not None)
    plan = plan_epochs(cfg, arch, data, run.epochs, run.snapshots, group.world_size)
    model, network, reinitialised = build_network(arch, classes, options, group, sync_batchnorm=cfg.sync_batchnorm,
                                                  init_from=run.init_from)
    optimization = build_optimization(recipe, model, device, total_steps=plan.total_steps, amp=cfg.amp,
                                      encoder_loaded=options.get("encoder_weights") is not None)
    balance = class_balance(cfg, data.labeled_samples, len(classes), model, device,
                            warm_started=run.init_from is not None and not reinitialised)
    weighting = LossWeighting(recipe.aux_weight, cfg.pseudo_weight, balance.weight,
                              unlabeled_class_weight(balance.weight, cfg.unlabeled_class_weighting), cfg.loss)
    ema = mean_teacher(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    step = TrainStep(network, optimization, weighting, device=device, compile=cfg.compile,
                     batch_augment=batch_augment, consistency=cfg.consistency, ema=ema, total_steps=plan.total_steps)
    # The class weights go with the model: pseudo-labeling undoes the bias they give its probabilities.
    card = ModelCard(arch=arch, num_classes=len(classes), classes=classes, options=options, crop_size=cfg.crop_size,
                     extra={"recipe": recipe.describe(models.describe(arch).aux),
                            **({} if init_source is None else {"init_from": init_source, "reinitialised": reinitialised}),
                            **({} if balance.weight is None else {"class_weight": balance.weight.tolist()}),
                            **({} if balance.prior_layer is None else {"prior_init": f"{balance.prior_layer}.bias"})})
    evaluated = ema.module if ema is not None and cfg.ema.evaluate else model
    return Training(recipe, data, plan, step, evaluated, card)


def _train(cfg: TrainParams, arch: str, group: ProcessGroup, run: TrainRun, training: Training,
           mlflow_cfg: MlflowParams, *, reliable_fraction: float, val_batch_size: int) -> TrainResult:
    """One process's training: the epochs (from a checkpoint with ``run.resume``), then the model folder (rank 0)."""
    data, plan, step, card = training.data, training.plan, training.step, training.card
    resume_dir = checkpoint.resume_dir_for(run.out_dir)
    settings = _resume_settings(cfg, arch, run, training, group, reliable_fraction=reliable_fraction,
                                val_batch_size=val_batch_size)
    checkpointer = Checkpointer(resume_dir, group, settings, plan, cfg.checkpoint_every_steps, model=step.model,
                                optimizer=step.optimizer, scheduler=step.scheduler, scaler=step.scaler, ema=step.ema)
    progress, loss_sum = checkpointer.begin(run.resume)

    mlflow_run = tracking.stage_run(mlflow_cfg, "train", run.name, run_id=progress.run_id) if group.is_main \
        else contextlib.nullcontext()
    with mlflow_run as active:
        if group.is_main and progress.run_id is None:
            progress.run_id = active.info.run_id
            mlflow.log_params(_run_params(cfg, arch, training, group))
            mlflow.set_tag("segflow.arch", arch)
            tracking.log_dataset(run.data_dir, run.splits_csv, card.classes)
        unlabeled = None if data.unlabeled_loader is None else unlabeled_batches(
            data.unlabeled_loader, (progress.epoch - 1) * plan.batches_per_epoch + progress.batches_done)

        # end_of_epoch moves progress on; train.patience may end it before train.epochs.
        while progress.epoch <= plan.epochs and not patience_ran_out(cfg.patience, progress):
            train_epoch(step, data, plan, progress, loss_sum, checkpointer, unlabeled=unlabeled, title=run.name,
                        show=group.is_main)
            end_of_epoch(step, data, plan, progress, loss_sum, checkpointer, arch=arch, evaluated=training.evaluated,
                         card=card, splits_csv=run.splits_csv)

        seconds = checkpointer.elapsed()
        end = training_end(progress, plan, cfg.patience)
        if group.is_main:
            _report_end(arch, end, progress)
            _keep_model_folder(run, training, resume_dir, progress, seconds, end)
            mlflow.log_metrics({"best_val_miou": progress.best_miou, "train_seconds": seconds})
            mlflow.log_artifacts(str(run.out_dir), artifact_path="checkpoint")
            checkpoint.remove(resume_dir)
    distributed.barrier(group)
    return TrainResult(run.out_dir, progress.best_miou, progress.best_epoch, seconds, progress.history,
                       step.scheduler.last_epoch)


def _report_end(arch: str, end: dict, progress: Progress) -> None:
    if end["reason"] == "patience":
        log.info("%s: stopped at epoch %d of %d: no better val mIoU in %d validations (train.patience); best %.4f at "
                 "epoch %d", arch, end["epoch"], end["max_epochs"], end["patience"], progress.best_miou,
                 progress.best_epoch)
    elif end["still_improving"]:
        log.warning("%s: the last validation (epoch %d) was the best: the model was still improving; raise "
                    "train.epochs (or teacher.epochs for the teacher) to train it longer", arch, end["epoch"])


def _keep_model_folder(run: TrainRun, training: Training, resume_dir: Path, progress: Progress, seconds: float,
                       end: dict) -> None:
    """The Mean Teacher (it still makes the pseudo-labels) and the last weights beside the best (MMSeg's latest)
    when asked for, then the model folder, whole."""
    ema, evaluated, card = training.step.ema, training.evaluated, training.card
    if ema is not None and evaluated is not ema.module:
        save_model(ema.module, card, resume_dir / EMA_DIR)
    if run.keep_last and progress.best_epoch != end["epoch"]:
        save_model(evaluated, replace(card, extra={"epoch": end["epoch"]}), resume_dir / LAST_DIR)
    _write_model_dir(run.out_dir, resume_dir, replace(card, extra={**card.extra, "training_end": end}), progress,
                     seconds)


def _resume_settings(cfg: TrainParams, arch: str, run: TrainRun, training: Training, group: ProcessGroup, *,
                     reliable_fraction: float, val_batch_size: int) -> dict[str, Any]:
    """What a resumed training must share with the interrupted one to continue it exactly: its parameters and
    the SHA-256 of every file it reads (the ingested data, the split, the pseudo-labels)."""
    data_dir, splits_csv, pseudo_dir = run.data_dir, run.splits_csv, run.pseudo_dir
    return {
        "arch": arch, "epochs": training.plan.epochs, "model_options": training.card.options,
        "processes": group.world_size, "init_from": training.card.extra.get("init_from"),
        **{f"recipe.{key}": value for key, value in training.recipe.settings().items()},
        # Settings that change neither the numbers nor the order may differ when resuming.
        **{f"train.{key}": value for key, value in cfg.model_dump(mode="json").items()
           if key not in ("num_workers", "device", "checkpoint_every_steps", "compile", "decoded_cache", "archs")},
        # What train.batch_augment: auto became: it differs between devices.
        "train.batch_augment": training.step.batch_augment is not None,
        "pseudo_label.reliable_fraction": reliable_fraction,
        "evaluate.batch_size": val_batch_size,
        f"{splits_csv} (SHA-256)": file_sha256(splits_csv),
        f"{data_dir} (SHA-256 of each file)": ingested_sha256(data_dir),
        **({} if pseudo_dir is None else {f"{pseudo_dir} (SHA-256 of each file)": folder_sha256(pseudo_dir)}),
    }


def _run_params(cfg: TrainParams, arch: str, training: Training, group: ProcessGroup) -> dict[str, Any]:
    """The training's parameters as the MLflow run records them."""
    recipe, data, options = training.recipe, training.data, training.card.options
    epochs, amp = training.plan.epochs, training.step.amp
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
