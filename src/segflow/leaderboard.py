"""The comparison users want: one row per architecture, as Markdown and JSON, also logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from segflow import tracking
from segflow.config import Params
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json, atomic_write_text

COLUMNS = [
    ("miou", "test mIoU", "{:.4f}"),
    ("best_val_miou", "val mIoU", "{:.4f}"),
    ("pixel_accuracy", "pixel acc.", "{:.4f}"),
    ("mean_class_accuracy", "mean class acc.", "{:.4f}"),
    ("parameters", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs", "{:.2f}"),
    ("train_seconds", "train (s)", "{:.0f}"),
    ("images_per_second", "inference img/s", "{:.1f}"),
]


def _cell(value: object, fmt: str, key: str) -> str:
    if value is None:
        return "–"
    return fmt.format(value / 1e6 if key == "parameters" else value)


SEMI_SUPERVISED_FILE = "semi_supervised.json"  # the teacher stage's evidence (segflow.teacher)
TEACHER_ARMS = {"labeled_only": "labeled-only", "with_unlabeled": "with unlabeled"}


def semi_supervised_section(summary: dict, teacher_arch: str) -> list[str]:
    """The teacher stage's comparison as Markdown: both teachers at the same budget, and what was decided."""
    lines = ["", f"Do the unlabeled images pay? The teacher's architecture ({teacher_arch}) trained twice at the same "
             "budget (same optimizer steps, same initial weights):", "",
             "| teacher | val mIoU | test mIoU | optimizer steps | kept |", "|---|---|---|---|---|"]
    for arm, title in TEACHER_ARMS.items():
        if arm in summary:
            scores = summary[arm]
            lines.append(f"| {title} | {_cell(scores['val_miou'], '{:.4f}', '')} | "
                         f"{_cell(scores['test_miou'], '{:.4f}', '')} | {scores['steps']} | "
                         f"{'yes' if summary['kept'] == arm else ''} |")
    verdict = "used by the architectures" if summary["use_unlabeled"] else "not used"
    return [*lines, "", f"Decision: the unlabeled images are {verdict} ({summary['reason']})."]


def leaderboard(params: Params, *, metrics_dir: Path, names: list[str], out_json: Path, out_markdown: Path) -> list[dict]:
    """Rank ``names`` (architectures, and ``teacher``) by test mIoU; write JSON and a Markdown table, with the
    teacher stage's labeled-only / with-unlabeled comparison under it when there is one."""
    rows = []
    for name in names:
        path = Path(metrics_dir) / f"{name}.json"
        try:
            metrics = json.loads(path.read_text())
        except FileNotFoundError:
            raise SegflowError(f"{path}: no evaluation for {name}; run the evaluate stage first.") from None
        rows.append({"name": name, "arch": metrics.get("arch", name), **{k: metrics.get(k) for k, _, _ in COLUMNS}})
    rows.sort(key=lambda row: -(row["miou"] if row["miou"] is not None else -1))
    header = "| rank | model | arch | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    for rank, row in enumerate(rows, 1):
        cells = " | ".join(_cell(row[key], fmt, key) for key, _, fmt in COLUMNS)
        lines.append(f"| {rank} | {row['name']} | {row['arch']} | {cells} |")
    semi_supervised_file = Path(metrics_dir) / SEMI_SUPERVISED_FILE
    if semi_supervised_file.exists():
        summary = json.loads(semi_supervised_file.read_text())
        lines += semi_supervised_section(summary, params.teacher.arch)
        for arm, title in TEACHER_ARMS.items():
            if arm in summary:
                rows.append({"name": f"teacher, {title}",
                             "arch": params.teacher.arch, "miou": summary[arm]["test_miou"],
                             "best_val_miou": summary[arm]["val_miou"], "kept": summary["kept"] == arm,
                             "use_unlabeled": summary["use_unlabeled"]})
    atomic_write_json(out_json, rows)
    atomic_write_text(out_markdown, "\n".join(lines) + "\n")
    with tracking.stage_run(params.mlflow, "leaderboard"):
        mlflow.log_artifact(str(out_json))
        mlflow.log_artifact(str(out_markdown))
        ranked = [row for row in rows if "kept" not in row]
        mlflow.log_table({k: [row[k] for row in ranked] for k in ranked[0]}, "leaderboard_table.json")
    return rows
