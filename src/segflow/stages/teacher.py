"""The teacher stage: do the unlabeled images pay, on this data, at this budget?

The teacher's architecture is trained twice from the same initial weights for the same optimizer steps:
labeled-only, and with the unlabeled images (weak-to-strong consistency, targets from the Mean Teacher when
``train.ema`` is on). With ``teacher.warm_start`` (the default) those initial weights are a labeled-only teacher
trained first, and both arms continue from it for ``teacher.continue_epochs``: from random init, a few hundred
steps of consistency teach a model its own first guesses. Both are scored on val and test. The semi-supervised teacher is kept, and the architectures
use the unlabeled images (``train.use_pseudo_labels: auto``), only when it beat its labeled-only twin on val by more
than ``teacher.margin``; the decision and the four scores go to ``metrics/semi_supervised.json``, to MLflow and to
the leaderboard.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from segflow.config import InferenceParams, MlflowParams, TeacherParams, TrainParams
from segflow.data.datasets import load_samples
from segflow.fsutil import atomic_dir, atomic_write_json
from segflow.inference.card import read_card
from segflow.inference.metrics import score_split
from segflow.registry import tracking
from segflow.stages.train import TrainRun, train
from segflow.training.semi_supervised import labeled_only, unlabeled_images_won, with_unlabeled

LABELED_ONLY, WITH_UNLABELED, START = "labeled_only", "with_unlabeled", "start"


def train_teacher(
    cfg: TeacherParams, train_cfg: TrainParams, *, model_options: dict[str, Any], val_batch_size: int,
    inference: InferenceParams, mlflow_cfg: MlflowParams, data_dir: Path, splits_csv: Path, out_dir: Path,
    metrics_file: Path,
) -> dict:
    """Train both teachers, keep the one the evidence picks in ``out_dir`` and write ``metrics_file``; returns
    its contents (``labeled_only`` and ``with_unlabeled``: val and test mIoU, optimizer steps, seconds;
    ``use_unlabeled``, ``kept``, ``margin``, ``reason``, ``warm_start``; with it ``start``: the labeled-only
    teacher both arms continue from). Every training uses ``train_cfg`` and the builder's ``model_options``;
    each is scored on test with ``inference`` at ``val_batch_size`` images a batch."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    epochs = cfg.epochs or train_cfg.epochs
    arm_epochs = (cfg.continue_epochs or epochs) if cfg.warm_start else epochs
    arms = {LABELED_ONLY: labeled_only(train_cfg)}
    unlabeled = load_samples(data_dir, splits_csv, "unlabeled")
    if unlabeled:
        arms[WITH_UNLABELED] = with_unlabeled(train_cfg, cfg.consistency_weight)
    scores = {}
    with tracking.stage_run(mlflow_cfg, "teacher", "teacher") as run, \
            tracking.runs_nested_under(run.info.run_id), \
            tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-arms-") as work_dir:

        def train_and_score(name: str, arm_cfg: TrainParams, arm_epochs: int, init_from: Path | None) -> None:
            run = TrainRun(data_dir, splits_csv, Path(work_dir) / name, epochs=arm_epochs,
                           name=f"teacher {name.replace('_', '-')}", snapshots=0 if name == START else cfg.snapshots,
                           init_from=init_from)
            result = train(arm_cfg, cfg.arch, run, model_options=model_options, mlflow_cfg=mlflow_cfg,
                           val_batch_size=val_batch_size)
            test = score_split(result.model_dir, data_dir, splits_csv, "test", device=arm_cfg.device,
                               batch_size=val_batch_size, inference=inference)
            scores[name] = {"val_miou": result.best_miou,
                            "test_miou": None if test is None else test["miou"],
                            "steps": result.steps, "seconds": result.seconds}

        start = None
        if cfg.warm_start:  # the arms' common initial weights: a labeled-only teacher
            train_and_score(START, labeled_only(train_cfg), epochs, None)
            start = Path(work_dir) / START
        for name, arm_cfg in arms.items():
            train_and_score(name, arm_cfg, arm_epochs, start)
        use, reason = _decide(scores, cfg.margin, splits_csv)
        kept = WITH_UNLABELED if use else LABELED_ONLY
        with atomic_dir(out_dir) as staging:
            shutil.copytree(Path(work_dir) / kept, staging, dirs_exist_ok=True)
        summary = {**scores, "use_unlabeled": use, "kept": kept, "margin": cfg.margin, "reason": reason,
                   "warm_start": cfg.warm_start}
        mlflow.log_params({"teacher_arch": cfg.arch, "epochs": epochs, "arm_epochs": arm_epochs,
                           "warm_start": cfg.warm_start, "margin": cfg.margin,
                           "consistency_weight": cfg.consistency_weight, "unlabeled_images": len(unlabeled)})
        _log_decision(summary, kept_run_id=read_card(out_dir).extra[tracking.TRAINING_RUN_KEY])
    atomic_write_json(metrics_file, summary)
    return summary


def _decide(scores: dict[str, dict], margin: float, splits_csv: Path) -> tuple[bool, str]:
    """Whether the unlabeled images are used, and why (``teacher.margin``: what with them must win by on val)."""
    if WITH_UNLABELED not in scores:
        return False, f"no unlabeled images in {splits_csv}"
    with_them, without = scores[WITH_UNLABELED]["val_miou"], scores[LABELED_ONLY]["val_miou"]
    return (unlabeled_images_won(without, with_them, margin),
            f"val mIoU {with_them:.4f} with the unlabeled images against {without:.4f} without (margin {margin:g})")


def _log_decision(summary: dict, *, kept_run_id: str) -> None:
    """The arms' scores and the decision in the teacher stage's MLflow run; ``kept_run_id`` is the kept arm's
    training run, where the teacher model's evaluation and registration go."""
    scores = {arm: arm_scores for arm, arm_scores in summary.items() if isinstance(arm_scores, dict)}
    mlflow.log_metrics({f"{arm}.{key}": value for arm, arm_scores in scores.items()
                        for key, value in arm_scores.items() if value is not None})
    mlflow.log_metric("use_unlabeled", float(summary["use_unlabeled"]))
    mlflow.set_tags({"segflow.use_unlabeled": str(summary["use_unlabeled"]).lower(),
                     "segflow.decision": summary["reason"], "segflow.kept_run_id": kept_run_id})
    mlflow.log_dict(summary, "semi_supervised.json")
