"""The comparison users want: one row per candidate model, ranked as register chooses, as Markdown and JSON, also
logged to MLflow."""

from __future__ import annotations

import csv
import json
import posixpath
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from segflow.config import MlflowParams, RegisterParams
from segflow.fsutil import atomic_write_json, atomic_write_text, csv_text
from segflow.inference.scores import floor_failures, rank_candidates, read_scores
from segflow.registry import tracking

COLUMNS = [  # (key in the row, title, format)
    ("val_miou", "val mIoU", "{:.4f}"),
    ("miou", "test mIoU", "{:.4f}"),
    ("pixel_accuracy", "pixel acc.", "{:.4f}"),
    ("mean_class_accuracy", "mean class acc.", "{:.4f}"),
    ("parameters", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs", "{:.2f}"),
    ("train_seconds", "train (s)", "{:.0f}"),
    ("images_per_second", "inference img/s", "{:.1f}"),
]


def _row(name: str, scores: dict) -> dict:
    test = scores["test"]
    return {"name": name, "arch": scores["arch"], "val_miou": scores["val"]["miou"], "miou": test["miou"],
            "pixel_accuracy": test["pixel_accuracy"], "mean_class_accuracy": test["mean_class_accuracy"],
            **{key: scores.get(key) for key in ("parameters", "gflops", "train_seconds", "images_per_second")}}


def _cell(value: object, fmt: str, key: str) -> str:
    if value is None:
        return "–"
    return fmt.format(value / 1e6 if key == "parameters" else value)


SEMI_SUPERVISED_FILE = "semi_supervised.json"  # the teacher stage's evidence (segflow.stages.teacher)
SPLIT_FILE = "split.json"  # the split stage's sizes and near-copy count (segflow.stages.split)
TEACHER_ARMS = {"labeled_only": "labeled-only", "with_unlabeled": "with unlabeled"}


def semi_supervised_section(summary: dict, teacher_arch: str) -> list[str]:
    """The teacher stage's comparison as Markdown: both teachers at the same budget, where they started, and what
    was decided."""
    start = ("both continuing from a labeled-only teacher trained first (its row: start)" if summary.get("warm_start")
             else "both from the same random initial weights")
    lines = ["", f"Do the unlabeled images pay? The teacher's architecture ({teacher_arch}) trained twice at the same "
             f"budget (same optimizer steps), {start}:", "",
             "| teacher | val mIoU | test mIoU | optimizer steps | kept |", "|---|---|---|---|---|"]
    for arm, title in {"start": "start (labeled-only)", **TEACHER_ARMS}.items():
        if arm in summary:
            scores = summary[arm]
            lines.append(f"| {title} | {_cell(scores['val_miou'], '{:.4f}', '')} | "
                         f"{_cell(scores['test_miou'], '{:.4f}', '')} | {scores['steps']} | "
                         f"{'yes' if summary['kept'] == arm else ''} |")
    verdict = "used by the architectures" if summary["use_unlabeled"] else "not used"
    return [*lines, "", f"Decision: the unlabeled images are {verdict} ({summary['reason']})."]


def learning_curves(history_dir: Path, names: list[str]) -> str:
    """The candidates' per-epoch tables (``epoch,train_loss,val_miou``) as one CSV with a ``model`` column."""
    rows = []
    for name in names:
        with open(Path(history_dir) / f"{name}.csv", newline="") as file:
            rows += [[name, row["epoch"], row["train_loss"], row["val_miou"]] for row in csv.DictReader(file)]
    return csv_text(["model", "epoch", "train_loss", "val_miou"], rows)


def training_end_lines(scores: dict[str, dict]) -> list[str]:
    """Which candidates stopped early (train.patience) and which were still improving at their last validation
    (more epochs would likely help)."""
    ends = {name: score.get("training_end") for name, score in scores.items() if score.get("training_end")}
    stopped = [f"{name} at epoch {end['epoch']} of {end['max_epochs']}" for name, end in ends.items()
               if end["reason"] == "patience"]
    improving = [name for name, end in ends.items() if end["reason"] == "epochs" and end["still_improving"]]
    return ([f"Stopped early (no better val mIoU in train.patience validations): {', '.join(stopped)}."]
            if stopped else []) + ([f"Still improving at their last validation: {', '.join(improving)}; raise "
                                    "train.epochs (teacher.epochs for the teacher) to train them longer."]
                                   if improving else [])


def near_copy_lines(split_file: Path) -> list[str]:
    """How many test images have a near-copy among the training images (segflow.data.near_copies): 0 unless a
    predefined split was let in by validate.allow_shared_pictures, and then the test scores are inflated."""
    if not split_file.exists():
        return []
    summary = json.loads(split_file.read_text())
    count, total = summary["test_images_with_a_near_copy_in_training"], summary["test_images"]
    return [f"Test images with a near-copy among the training images: {count} of {total}"
            + ("." if count == 0 else " (validate.allow_shared_pictures let them in: the test scores are inflated).")]


def leaderboard(
    cfg: RegisterParams, mlflow_cfg: MlflowParams, *, teacher_arch: str, evaluation_dir: Path, metrics_dir: Path,
    history_dir: Path, names: list[str], out_json: Path, out_markdown: Path, out_curves: Path,
) -> list[dict]:
    """Rank the candidates ``names`` (architectures, and ``teacher``) on val by ``register.metric``, as register
    chooses, marking the one it will register and whether it clears the floor; write JSON and a Markdown table,
    with the teacher stage's labeled-only / with-unlabeled comparison under it when there is one, and every
    candidate's learning curve in one long table ``out_curves`` (model, epoch, train_loss, val_miou) for
    ``dvc plots show``, from the evaluate stage's ``history_dir/NAME.csv``."""
    scores = {name: read_scores(evaluation_dir, name) for name in names}
    ranked = rank_candidates(scores, cfg.metric)
    chosen = ranked[0][0]
    floor = floor_failures(scores[chosen], cfg)
    rows = [{**_row(name, scores[name]), "selected": name == chosen} for name, _ in ranked]
    header = "| rank | model | arch | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [f"Ranked on val {cfg.metric} (the test split reports; it does not choose).", "", header,
             "|" + "---|" * (len(COLUMNS) + 3)]
    for rank, row in enumerate(rows, 1):
        cells = " | ".join(_cell(row[key], fmt, key) for key, _, fmt in COLUMNS)
        name = f"**{row['name']}** (selected)" if row["selected"] else row["name"]
        lines.append(f"| {rank} | {name} | {row['arch']} | {cells} |")
    baseline = scores[chosen]["majority_baseline"]
    lines += ["", f"Baseline: predicting '{baseline['class']}' everywhere scores test {cfg.metric} "
                  f"{baseline[cfg.metric]:.4f}.",
              f"Floor: {chosen} {'is below it: ' + '; '.join(floor) + ' (it cannot become champion)' if floor else 'clears it'}."]
    lines += training_end_lines(scores)
    lines += near_copy_lines(Path(metrics_dir) / SPLIT_FILE)
    semi_supervised_file = Path(metrics_dir) / SEMI_SUPERVISED_FILE
    if semi_supervised_file.exists():
        summary = json.loads(semi_supervised_file.read_text())
        lines += semi_supervised_section(summary, teacher_arch)
        for arm, title in TEACHER_ARMS.items():
            if arm in summary:
                rows.append({"name": f"teacher, {title}",
                             "arch": teacher_arch, "miou": summary[arm]["test_miou"],
                             "val_miou": summary[arm]["val_miou"], "kept": summary["kept"] == arm,
                             "use_unlabeled": summary["use_unlabeled"]})
    atomic_write_json(out_json, rows)
    atomic_write_text(out_markdown, "\n".join(lines) + "\n")
    atomic_write_text(out_curves, learning_curves(history_dir, names))
    candidates = [row for row in rows if "kept" not in row]
    table = {k: [row[k] for row in candidates] for k in candidates[0]}
    with tracking.stage_run(mlflow_cfg, "leaderboard") as run:
        mlflow.set_tag(MLFLOW_RUN_NOTE, "\n".join(lines))  # the run's page opens on the table
        # This run, and the pipeline run it belongs to (its summary, beside the register stage's decision).
        for run_id, folder in ((run.info.run_id, None), (tracking.parent_run_id(run), "summary")):
            if run_id is not None:
                mlflow.log_artifact(str(out_json), folder, run_id=run_id)
                mlflow.log_artifact(str(out_markdown), folder, run_id=run_id)
                mlflow.log_table(table, posixpath.join(folder or "", "leaderboard_table.json"), run_id=run_id)
    return rows
