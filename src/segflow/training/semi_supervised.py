"""Whether the unlabeled images are used after the teacher stage: its evidence, read by the stages after it.

The teacher stage trains the teacher's architecture labeled-only and with the unlabeled images at the same
budget and writes both scores and the decision to ``metrics/semi_supervised.json``; with
``train.use_pseudo_labels: auto`` the architectures use the unlabeled images (pseudo-labels, and
``train.consistency`` if on) only when the semi-supervised teacher won on val by more than ``teacher.margin``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from segflow.config import TrainParams
from segflow.errors import SegflowError


def unlabeled_images_won(labeled_only_val: float, with_unlabeled_val: float, margin: float) -> bool:
    """The semi-supervised model won: its val score beats the labeled-only one's by more than ``margin``."""
    return math.isfinite(with_unlabeled_val) and (
        not math.isfinite(labeled_only_val) or with_unlabeled_val > labeled_only_val + margin)


def uses_unlabeled_images(setting: bool | str, decision_file: Path) -> bool:
    """``train.use_pseudo_labels``: true or false as set; auto as the teacher stage decided."""
    if setting != "auto":
        return bool(setting)
    try:
        return bool(json.loads(Path(decision_file).read_text())["use_unlabeled"])
    except FileNotFoundError:
        raise SegflowError(f"{decision_file}: missing; train.use_pseudo_labels is auto, which follows the teacher "
                           "stage's decision: run `segflow teacher` first (or set it to true or false).") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SegflowError(f"{decision_file}: not a teacher-stage decision (no use_unlabeled key); run "
                           "`segflow teacher` again.") from None


def architecture_params(cfg: TrainParams, decision_file: Path) -> tuple[TrainParams, bool]:
    """What an architecture trains with, and whether on the pseudo-labels: ``train.use_pseudo_labels`` true or
    false as set (``train.consistency`` as set too); auto as the teacher stage decided, the consistency loss
    dropped with the pseudo-labels when the unlabeled images did not pay."""
    if uses_unlabeled_images(cfg.use_pseudo_labels, decision_file):
        return cfg, True
    return (cfg if cfg.use_pseudo_labels is False else labeled_only(cfg)), False


def labeled_only(cfg: TrainParams) -> TrainParams:
    """``cfg`` with the unlabeled images left out: no pseudo-labels, no consistency loss."""
    return with_unlabeled(cfg, 0.0)


def with_unlabeled(cfg: TrainParams, consistency_weight: float) -> TrainParams:
    """``cfg`` with weak-to-strong consistency on the unlabeled images at ``consistency_weight`` (0: none) and
    no pseudo-labels (this is the teacher that would make them)."""
    return cfg.model_copy(update={
        "use_pseudo_labels": False, "consistency": cfg.consistency.model_copy(update={"weight": consistency_weight})})
