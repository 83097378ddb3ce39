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


def leaderboard(params: Params, *, metrics_dir: Path, names: list[str], out_json: Path, out_markdown: Path) -> list[dict]:
    """Rank ``names`` (architectures, and ``teacher``) by test mIoU; write JSON and a Markdown table."""
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
    atomic_write_json(out_json, rows)
    atomic_write_text(out_markdown, "\n".join(lines) + "\n")
    with tracking.stage_run(params.mlflow, "leaderboard"):
        mlflow.log_artifact(str(out_json))
        mlflow.log_artifact(str(out_markdown))
        mlflow.log_table({k: [row[k] for row in rows] for k in rows[0]}, "leaderboard_table.json")
    return rows
