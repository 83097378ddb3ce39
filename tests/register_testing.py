"""The evaluate stage's scores file, written by hand for the register and registry tests."""

from __future__ import annotations

import json
from pathlib import Path

from segflow.config import InferenceParams
from segflow.scores import SCORES_FILE


def write_scores(
    evaluation_dir: Path, name: str, *, arch: str, test: float, val: float | None = None, data_hash: str = "hash-1",
    predicted: tuple[str, ...] = ("background", "thing"), baseline: float = 0.0,
    inference: InferenceParams | None = None,
) -> None:
    """``evaluation_dir/NAME/scores.json`` with mIoU ``test`` (and ``val``, default the same) and the floor's
    inputs: the classes predicted on test and the majority-class baseline; ``inference``: the settings it was
    scored with (default: evaluate.inference's default, whole image)."""
    val = test if val is None else val
    folder = Path(evaluation_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCORES_FILE).write_text(json.dumps({
        "name": name, "arch": arch, "val": {"miou": val},
        "test": {"miou": test, "data_hash": data_hash, "predicted_classes": list(predicted)},
        "majority_baseline": {"class": "background", "miou": baseline},
        "inference": (inference or InferenceParams()).model_dump(mode="json"),
    }))
