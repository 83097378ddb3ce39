"""Trained-model files (safetensors weights + a JSON card) and prediction, shared by every consumer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from segflow import models
from segflow.data import MEAN, STD, to_tensor
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


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


def save_model(model: torch.nn.Module, card: ModelCard, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS_FILE)
    atomic_write_json(out_dir / CARD_FILE, asdict(card))


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        return ModelCard(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError) as exc:
        raise SegflowError(f"{path}: not a segflow model card ({exc}).") from None


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the architecture from its card and load safetensors weights (never a pickle)."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    options = {k: v for k, v in card.options.items() if k != "encoder_weights"}
    model = models.build(card.arch, num_classes=card.num_classes, **options)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    return model.to(device).eval(), card


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SegflowError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits N×K×H×W (autocast on CUDA; plain float on the CPU)."""
    with torch.inference_mode(), torch.autocast(images.device.type, enabled=images.device.type == "cuda"):
        output = model(images)
    return output.float()


def predict_mask(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 image -> HxW uint8 class-index mask."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise SegflowError(f"expected an HxWx3 image, got an array of shape {image.shape}.")
    device = next(model.parameters()).device
    batch = to_tensor(image.astype(np.uint8))[None].to(device)
    return logits(model, batch).argmax(1)[0].to(torch.uint8).cpu().numpy()
