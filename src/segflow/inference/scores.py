"""An evaluated model's scores (``evaluation/NAME/scores.json``, written by the evaluate stage) and the choice
among candidates, shared by the leaderboard and register stages (no torch here: both stay quick to start).

Candidates are ranked on **val** with the inference settings they are served with; the test split only reports
the chosen one and gates its promotion, so the test figure the registry shows is not a selected one. A chosen
model must also clear a floor (:func:`floor_failures`) before it can become champion.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from segflow.config import RegisterParams
from segflow.errors import SegflowError

SCORES_FILE = "scores.json"


def read_scores(evaluation_dir: Path, name: str) -> dict[str, Any]:
    path = Path(evaluation_dir) / name / SCORES_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        what = "--teacher" if name == "teacher" else f"--arch {name}"
        raise SegflowError(f"{path}: no evaluation of {name}; run `segflow evaluate {what}` first.") from None
    except json.JSONDecodeError as exc:
        raise SegflowError(f"{path}: not readable JSON ({exc}); run the evaluate stage again.") from None


def _score(scores: dict[str, Any], split: str, metric: str, name: str) -> float:
    value = scores.get(split, {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SegflowError(
            f"the evaluation of {name} has no {split} {metric} (found {value!r}): a model without a score cannot be "
            "ranked or registered. Run its evaluate stage again.")
    return float(value)


def rank_candidates(candidates: dict[str, dict[str, Any]], metric: str) -> list[tuple[str, float]]:
    """Candidate names with their val ``metric``, best first; ties keep the order given (the params' order)."""
    ranked = [(name, _score(scores, "val", metric, name)) for name, scores in candidates.items()]
    return sorted(ranked, key=lambda item: -item[1])


def test_score(scores: dict[str, Any], metric: str, name: str) -> float:
    return _score(scores, "test", metric, name)


def floor_failures(scores: dict[str, Any], cfg: RegisterParams) -> list[str]:
    """Why a model may not become champion, whatever the champion is (none yet included): it must predict at
    least two classes on test, beat predicting the majority class everywhere by ``cfg.baseline_margin`` and
    reach ``cfg.min_score`` (both on ``cfg.metric``, test split). Empty when it clears the floor (or
    ``cfg.floor`` is off)."""
    if not cfg.floor:
        return []
    metric, test = cfg.metric, scores["test"]
    score, baseline = test[metric], scores["majority_baseline"]
    failures = []
    if len(test["predicted_classes"]) < 2:
        failures.append(f"it predicts only {', '.join(test['predicted_classes']) or 'nothing'} on the test images")
    if score <= baseline[metric] + cfg.baseline_margin:
        failures.append(f"test {metric} {score:.4f} does not beat predicting '{baseline['class']}' everywhere "
                        f"({baseline[metric]:.4f}) by more than register.baseline_margin {cfg.baseline_margin}")
    if score < cfg.min_score:
        failures.append(f"test {metric} {score:.4f} is below register.min_score {cfg.min_score}")
    return failures
