"""Trained-model weights (safetensors, rebuilt from the card in :mod:`segflow.inference.card`) and prediction, shared by every
consumer."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segflow import CARD_FILE, WEIGHTS_FILE, models
from segflow.config import InferenceParams
from segflow.data.datasets import to_tensor
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json
from segflow.inference.card import ModelCard, read_card


def save_model(model: torch.nn.Module, card: ModelCard, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(out_dir / WEIGHTS_FILE)
    atomic_write_json(out_dir / CARD_FILE, asdict(card))


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the architecture from its card and load safetensors weights (never a pickle)."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    options = {k: v for k, v in card.options.items() if k != "encoder_weights"}
    model = models.build(card.arch, num_classes=card.num_classes, **options)
    load_weights(model, model_dir / WEIGHTS_FILE)
    return model.to(device).eval(), card


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model``; a truncated file or tensors that do not fit are named, not a crash."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise SegflowError(f"{path}: no weights file.") from None
    except (SafetensorError, OSError) as exc:
        raise SegflowError(f"{path}: cannot read the weights ({exc}); the file is truncated or not safetensors. "
                           "Train the model again, or restore the file.") from None
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        problems = [f"{label} {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}"
                    for label, names in (("missing", missing), ("unexpected", unexpected),
                                         ("of another shape", misshapen)) if names]
        raise SegflowError(f"{path}: the weights do not fit the model its card describes: tensors "
                           f"{'; '.join(problems)}.")
    model.load_state_dict(state)


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


DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("segflow_deadline", default=None)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Inference in this context stops after ``seconds`` (checked between forward passes: one pass is never cut),
    raising a SegflowError that names the limit: a request's work ends when its time is up, not just its answer."""
    token = DEADLINE.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        DEADLINE.reset(token)


def _check_deadline() -> None:
    if (deadline := DEADLINE.get()) is not None and time.monotonic() > deadline[0]:
        raise SegflowError(f"predicting the image took more than {deadline[1]:g} s (evaluate.inference.max_seconds); "
                           "stopped. Send a smaller image, or raise that limit and register the model again.")


@torch.inference_mode()
def probabilities(model: torch.nn.Module, images: torch.Tensor, inference: InferenceParams) -> torch.Tensor:
    """Normalised images N×3×H×W -> class probabilities N×K×H×W, as ``inference`` says (its window made
    concrete: :func:`resolved_inference`): per scale (bilinear resize) whole-image or sliding-window logits,
    optionally also on the mirrored image, softmax, averaged."""
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    flips = (False, True) if inference.flip else (False,)
    for scale in inference.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False)
        for flip in flips:
            _check_deadline()
            batch = scaled.flip(-1) if flip else scaled
            if inference.mode == "slide":
                out = _sliding_window_logits(model, batch, *_window(inference), inference.windows_per_batch)
            else:
                out = logits(model, batch)
            out = (out.flip(-1) if flip else out).softmax(dim=1)
            if out.shape[-2:] != (height, width):
                out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
            total = out if total is None else total.add_(out)
    return total.div_(len(inference.scales) * len(flips))


DEFAULT_MAX_PIXELS = 4_000_000  # at least a 2000x2000 photo, whatever the training window


def max_pixels(inference: InferenceParams) -> int:
    """``inference.max_pixels``, or what null stands for: 16 windows (``inference.crop_size``) worth of pixels,
    at least :data:`DEFAULT_MAX_PIXELS`."""
    if inference.max_pixels is not None:
        return inference.max_pixels
    window = inference.crop_size or 0
    return max(DEFAULT_MAX_PIXELS, 16 * window * window)


def check_image_size(width: int, height: int, inference: InferenceParams, what: str) -> None:
    """Refuse an image larger than ``inference`` allows (:func:`max_pixels`), before it is decoded: a 310 kB PNG
    can hold 9000x9000 black pixels, gigabytes once decoded and minutes of inference."""
    limit = max_pixels(inference)
    if width * height > limit:
        raise SegflowError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the {limit:,} this model takes "
            "(evaluate.inference.max_pixels, made concrete when it was registered); send it downscaled or cut "
            "into tiles, or raise that limit and register the model again.")


def check_encoded_size(size: int, inference: InferenceParams, what: str) -> None:
    """Refuse an encoded image file over ``inference.max_image_mb`` before anything decodes it."""
    if size > inference.max_image_mb * 1e6:
        raise SegflowError(f"{what} is {size / 1e6:.1f} MB encoded, more than the {inference.max_image_mb:g} MB this "
                           "model takes (evaluate.inference.max_image_mb); send it compressed or downscaled.")


def resolved_inference(inference: InferenceParams, card: ModelCard, model_dir: Path) -> InferenceParams:
    """``inference`` for the model in ``model_dir`` (whose card is ``card``) with its sliding window, stride and
    pixel limit made concrete: a null ``crop_size`` is the crop the model was trained at (``card.crop_size``), a
    null ``stride`` / ``max_pixels`` what follows from the window. Resolved where the model is loaded, the
    settings predict and refuse the same wherever they travel."""
    window = inference.crop_size or card.crop_size
    if inference.mode == "slide" and window is None:
        raise SegflowError(f"{Path(model_dir) / CARD_FILE}: evaluate.inference.mode is 'slide' but no window size is "
                           "set (evaluate.inference.crop_size, or the card's crop_size: the training crop, which "
                           "cards written before segflow recorded it lack).")
    windowed = inference.model_copy(update={"crop_size": window})
    limits = {"max_pixels": max_pixels(windowed)}
    if inference.mode != "slide":
        return inference.model_copy(update=limits)
    window, stride = _window(windowed)
    return inference.model_copy(update={"crop_size": window, "stride": stride, **limits})


def _window(inference: InferenceParams) -> tuple[int, int]:
    """(window, stride) of the sliding window."""
    window = inference.crop_size
    if window is None:
        raise SegflowError("evaluate.inference.mode is 'slide' but no window size is set (crop_size).")
    stride = inference.stride or max(1, window * 2 // 3)
    if stride > window:
        # Pixels between windows would get no prediction at all.
        raise SegflowError(f"evaluate.inference.stride ({stride}) must not exceed the window ({window}).")
    return window, stride


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``length`` (the last window is moved back to end at the border)."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _sliding_window_logits(
    model: torch.nn.Module, images: torch.Tensor, window: int, stride: int, windows_per_batch: int
) -> torch.Tensor:
    """Logits N×K×H×W from window×window crops (overlaps averaged); images smaller than the window are
    zero-padded (the dataset mean after normalisation). Crops go through the network ``windows_per_batch`` at a
    time, which bounds memory whatever the image size."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, max(0, window - width), 0, max(0, window - height)))
    padded_height, padded_width = padded.shape[-2:]
    offsets = [(top, left) for top in _window_starts(padded_height, window, stride)
               for left in _window_starts(padded_width, window, stride)]
    tiles = [(n, top, left) for n in range(images.shape[0]) for top, left in offsets]
    summed: torch.Tensor | None = None
    for first in range(0, len(tiles), windows_per_batch):
        _check_deadline()
        chunk = tiles[first : first + windows_per_batch]
        crops = torch.stack([padded[n, :, top : top + window, left : left + window] for n, top, left in chunk])
        out = logits(model, crops)
        if summed is None:
            summed = out.new_zeros((images.shape[0], out.shape[1], padded_height, padded_width))
        for (n, top, left), tile in zip(chunk, out):
            summed[n, :, top : top + window, left : left + window] += tile
    count = images.new_zeros((padded_height, padded_width))
    for top, left in offsets:
        count[top : top + window, left : left + window] += 1
    return (summed / count)[..., :height, :width]


def predict_classes(
    model: torch.nn.Module, images: torch.Tensor, inference: InferenceParams | None = None,
) -> torch.Tensor:
    """Normalised images N×3×H×W -> class indices N×H×W: plain whole-image logits unless ``inference`` is given."""
    if inference is None:
        return logits(model, images).argmax(1)
    return probabilities(model, images, inference).argmax(1)


def _image_batch(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 image -> a normalised 1×3×H×W batch on ``model``'s device."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise SegflowError(f"expected an HxWx3 image, got an array of shape {image.shape}.")
    device = next(model.parameters()).device
    return to_tensor(image.astype(np.uint8))[None].to(device)


def predict_mask(model: torch.nn.Module, image: np.ndarray, inference: InferenceParams | None = None) -> np.ndarray:
    """HxWx3 uint8 image -> HxW uint8 class-index mask (see :func:`predict_classes`)."""
    batch = _image_batch(model, image)
    return predict_classes(model, batch, inference)[0].to(torch.uint8).cpu().numpy()


def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray, inference: InferenceParams | None = None,
) -> np.ndarray:
    """HxWx3 uint8 image -> K×H×W float32 class probabilities (channels first, as the network outputs them);
    without ``inference``, the softmax of plain whole-image logits."""
    batch = _image_batch(model, image)
    return probabilities(model, batch, inference or InferenceParams())[0].cpu().numpy()
