"""Self-training rounds for the teacher: labeled-only first, then each student, trained on the labeled images
plus the current teacher's pseudo-labels, becomes the next teacher as long as it raises val mIoU.

Every student sees each labeled image as often as the labeled-only round did, the pseudo-labeled images
coming on top (with labeled oversampling, about twice the optimizer steps).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow

from segflow import tracking
from segflow.config import Params
from segflow.data import load_pseudo_samples, load_samples
from segflow.fsutil import atomic_dir, atomic_write_json
from segflow.pseudo_label import pseudo_label
from segflow.train import mix_labeled_and_pseudo, train

ROUND_RECORD = "round.json"


def _student_epochs(teacher_epochs: int, labeled: int, student_images: int, pseudo: int) -> int:
    """Epochs in which the student sees each labeled image as often as the labeled-only round did."""
    labeled_passes_per_epoch = (student_images - pseudo) // labeled
    return max(1, round(teacher_epochs / labeled_passes_per_epoch))


def _finished_round(round_dir: Path) -> dict | None:
    """The record of a round already finished in this work folder (a long run can be resumed)."""
    path = round_dir / ROUND_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _save_round(round_dir: Path, record: dict) -> dict:
    atomic_write_json(round_dir / ROUND_RECORD, record)
    return record


def self_train(params: Params, *, data_dir: Path, splits_csv: Path, work_dir: Path) -> list[dict]:
    """Run the rounds in ``work_dir`` (``round_N/model``, ``round_N/pseudo``, ``round_N/round.json``); returns
    one record per round, the one marked ``best`` being the teacher to keep. Stops after ``teacher.rounds``
    rounds, or as soon as a student fails to beat its teacher's val mIoU by more than ``teacher.min_improvement``.
    Rounds already finished in ``work_dir`` are not run again."""
    cfg = params.teacher
    work_dir = Path(work_dir)
    epochs = cfg.epochs or params.train.epochs
    labeled = load_samples(data_dir, splits_csv, "train")
    round_dir = work_dir / "round_0"
    record = _finished_round(round_dir)
    if record is None:
        result = train(params, cfg.arch, data_dir=data_dir, splits_csv=splits_csv, out_dir=round_dir / "model",
                       epochs=epochs, run_name="teacher round 0", snapshots=cfg.snapshots)
        record = _save_round(round_dir, {"round": 0, "val_miou": result.best_miou, "epochs": epochs,
                                        "train_images": len(labeled), "model_dir": str(result.model_dir)})
    records = [record]
    best = records[0]
    round_params = params
    for round_number in range(1, cfg.rounds + 1):
        round_dir = work_dir / f"round_{round_number}"
        record = _finished_round(round_dir)
        if record is None:
            pseudo_dir = round_dir / "pseudo"
            quality = pseudo_label(round_params, teacher_dir=Path(best["model_dir"]), data_dir=data_dir,
                                   splits_csv=splits_csv, out_dir=pseudo_dir,
                                   run_name=f"pseudo-label round {round_number}")
            pseudo = load_pseudo_samples(pseudo_dir, round_params.pseudo_label.reliable_fraction)
            student_images = len(mix_labeled_and_pseudo(labeled, pseudo, params.train.oversample_labeled))
            student_epochs = _student_epochs(epochs, len(labeled), student_images, len(pseudo))
            result = train(round_params, cfg.arch, data_dir=data_dir, splits_csv=splits_csv,
                           out_dir=round_dir / "model", pseudo_dir=pseudo_dir, epochs=student_epochs,
                           run_name=f"teacher round {round_number}", snapshots=cfg.snapshots,
                           init_from=Path(best["model_dir"]) if cfg.student_init == "teacher" else None)
            record = _save_round(round_dir, {
                "round": round_number, "val_miou": result.best_miou, "epochs": student_epochs,
                "train_images": student_images, "model_dir": str(result.model_dir),
                "coverage": quality["coverage"], "pseudo_accuracy": quality.get("pseudo_accuracy"),
                "prior_correction": quality["prior_correction"],
            })
        records.append(record)
        if not record["val_miou"] > best["val_miou"] + cfg.min_improvement:
            break
        best = record
        # ST++: the first round trains on the most reliable images only; later students relabel everything.
        round_params = params.model_copy(
            update={"pseudo_label": params.pseudo_label.model_copy(update={"reliable_fraction": 1.0})})
    for record in records:
        record["best"] = record is best
    return records


def train_teacher(
    params: Params, *, data_dir: Path, splits_csv: Path, out_dir: Path, metrics_file: Path
) -> list[dict]:
    """The teacher stage: ``teacher.rounds`` self-training rounds (0: labeled-only), the best round's model
    copied to ``out_dir`` and the rounds' scores to ``metrics_file`` and to one MLflow run above the rounds'."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run(params.mlflow, "self_training", "teacher") as run, \
            tracking.runs_nested_under(run.info.run_id), \
            tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-rounds-") as work_dir:
        records = self_train(params, data_dir=data_dir, splits_csv=splits_csv, work_dir=Path(work_dir))
        best = next(r for r in records if r["best"])
        with atomic_dir(out_dir) as staging:
            shutil.copytree(best["model_dir"], staging, dirs_exist_ok=True)
        for record in records:
            mlflow.log_metrics({k: record[k] for k in ("val_miou", "coverage", "pseudo_accuracy")
                                if record.get(k) is not None}, step=record["round"])
        mlflow.log_metrics({"best_round": best["round"], "best_val_miou": best["val_miou"]})
    summary = {
        "best_round": best["round"], "best_val_miou": best["val_miou"],
        **{f"round_{r['round']}": {k: v for k, v in r.items() if k not in ("round", "model_dir", "best")}
           for r in records},
    }
    atomic_write_json(metrics_file, summary)
    return records
