"""A model folder's card (``model.json``: what rebuilds the network without pickle) and its layout, torch-free:
registering, listing and the stages that only read cards load no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from segflow import CARD_FILE, MEAN, STD
from segflow.config import InferenceParams
from segflow.errors import SegflowError

SNAPSHOTS_DIR = "snapshots"  # earlier checkpoints kept inside a model folder (ST++ reliability)
EMA_DIR = "ema"  # the Mean Teacher inside a model folder whose trained weights were the ones evaluated
LAST_DIR = "last"  # the final weights inside a model folder whose best validation came earlier
# card.extra key: the inference settings a registered model was evaluated with (written by `segflow register`).
INFERENCE_KEY = "inference"


@dataclass
class ModelCard:
    """What is needed to rebuild a trained network without pickle."""

    arch: str
    num_classes: int
    classes: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    extra: dict[str, Any] = field(default_factory=dict)
    # The training crop: the sliding window where evaluate.inference leaves crop_size null. None in cards
    # written before segflow recorded it.
    crop_size: int | None = None


def registered_inference(card: ModelCard, model_dir: Path) -> InferenceParams | None:
    """The inference settings ``card`` carries (a registered model's, see :func:`resolved_inference`); None for a
    model folder straight from training, which predicts as ``evaluate.inference`` says."""
    settings = card.extra.get(INFERENCE_KEY)
    if settings is None:
        return None
    try:
        return InferenceParams.model_validate(settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SegflowError(f"{Path(model_dir) / CARD_FILE}: extra.{INFERENCE_KEY} is not a valid evaluate.inference "
                           f"for this segflow ({problems}); register the model again.") from None


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        return ModelCard(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError) as exc:
        raise SegflowError(f"{path}: not a segflow model card ({exc}).") from None
