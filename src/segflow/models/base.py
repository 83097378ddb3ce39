"""Shared base of every model in the zoo: pad/crop to the network stride, the aux convention, encoder weights.

Conventions (every registered model follows them):

* input N x 3 x H x W float (normalised), any H and W: :class:`SegmentationModel` zero-pads the bottom/right
  to a multiple of ``size_divisor`` (zero is the dataset mean after normalisation), runs the network, resizes
  the logits bilinearly to the padded size when the network predicts at a lower resolution, and crops back
  to H x W;
* eval mode: a tensor of logits N x K x H x W;
* training mode: models with an auxiliary head return ``{"out": logits, "aux": aux_logits}`` (both
  N x K x H x W); all others return the plain tensor.

``encoder_weights`` (every builder accepts it): ``None`` -> random initialisation; a path to a safetensors
file or a torch ``state_dict`` (``.pth``, read with ``weights_only=True``) -> loaded into the encoder /
backbone (:meth:`SegmentationModel.encoder_module`); ``"imagenet"`` -> the published ImageNet weights, or an
error naming the fix when they cannot be had (offline, or none published): a model asked for pretrained weights
is never silently trained from scratch; ``null`` is how params say random initialisation is wanted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segflow.errors import SegflowError

log = logging.getLogger("segflow.models")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

class SegmentationModel(nn.Module):
    """Base class: subclasses implement :meth:`_forward` on a padded input.

    ``_forward`` returns logits, or ``(logits, aux_logits)`` where ``aux_logits`` may be ``None``; both may be
    at a lower resolution than the (padded) input, they are resized bilinearly here.
    """

    size_divisor: int = 32
    lr_multipliers: dict[str, float] = {}
    """Learning-rate factor of the parameters whose names start with a prefix (on top of the recipe's groups)."""

    def _forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def encoder_module(self) -> nn.Module:
        """The part of the network that ``encoder_weights`` initialises."""
        return self.encoder

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        if x.ndim != 4:
            raise ValueError(f"expected an N x C x H x W tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        result = self._forward(x)
        out, aux = result if isinstance(result, tuple) else (result, None)
        size = x.shape[-2:]
        out = _resize_crop(out, size, h, w)
        if self.training and aux is not None:
            return {"out": out, "aux": _resize_crop(aux, size, h, w)}
        return out


def _resize_crop(logits: Tensor, size: torch.Size, h: int, w: int) -> Tensor:
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


# ----------------------------------------------------------------------------------------------- options


def channels(c: int, width: float) -> int:
    """``c`` scaled by the width multiplier, at least 1."""
    return max(1, int(round(c * width)))


def check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise SegflowError(f"option width must be a number in (0, 4], got {width!r}.")
    return float(width)


def check_choice(option: str, value: Any, choices: Iterator[Any] | tuple | list) -> Any:
    choices = list(choices)
    if value not in choices:
        raise SegflowError(f"option {option} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def check_flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SegflowError(f"option {option} must be true or false, got {value!r}.")
    return value


def check_probability(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise SegflowError(f"option {option} must be a number in [0, 1), got {value!r}.")
    return float(value)


# ----------------------------------------------------------------------------------------------- weights


def weights_kind(encoder_weights: Any) -> str:
    """Classify an ``encoder_weights`` value: ``"none"``, ``"file"`` or ``"named"`` (e.g. ``"imagenet"``)."""
    if encoder_weights is None or encoder_weights is False:
        return "none"
    if isinstance(encoder_weights, os.PathLike):
        return "file"
    if not isinstance(encoder_weights, str):
        raise SegflowError(f"option encoder_weights must be null, 'imagenet' or a file path; got {encoder_weights!r}.")
    value = encoder_weights.strip()
    if value.lower() in ("", "none", "null", "random"):
        return "none"
    if os.sep in value or "/" in value or value.lower().endswith(WEIGHT_SUFFIXES) or Path(value).is_file():
        return "file"
    return "named"


def check_encoder_weights(encoder_weights: Any, *, allow_other_names: bool = False) -> str:
    """Validate an ``encoder_weights`` value before anything is built; return its kind (see weights_kind)."""
    kind = weights_kind(encoder_weights)
    if kind == "file" and not Path(encoder_weights).expanduser().is_file():
        raise SegflowError(f"option encoder_weights: no such file {str(encoder_weights)!r}.")
    if kind == "named" and not allow_other_names and str(encoder_weights).strip().lower() != "imagenet":
        raise SegflowError(
            f"option encoder_weights must be null, 'imagenet' or a path to a .safetensors/.pth file; "
            f"got {encoder_weights!r} (no such file)."
        )
    return kind


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file or a torch state dict (``weights_only=True``, never an arbitrary pickle)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegflowError(f"option encoder_weights: no such file {str(path)!r}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SegflowError(f"option encoder_weights: cannot read {str(path)!r} as weights: {exc}") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SegflowError(f"option encoder_weights: {str(path)!r} does not hold a state dict of tensors.")
    return dict(state)


_PREFIXES = ("module.", "encoder.", "backbone.", "net.encoder.", "model.", "features.")


def _candidates(state: dict[str, Tensor], target_keys: set[str]) -> Iterator[dict[str, Tensor]]:
    yield state
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            yield {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    for prefix in ("model.", "features."):  # e.g. timm weights into SMP's TimmUniversalEncoder (keys "model.*")
        yield {prefix + k: v for k, v in state.items()}


def load_encoder_state(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``, tolerating a key prefix and extra keys (e.g. a classifier's ``fc.*``).

    Raises :class:`SegflowError` when nothing matches or a tensor has the wrong shape; warns about encoder
    tensors the file does not provide (they keep their random initialisation).
    """
    adapt = getattr(module, "adapt_state_dict", None)
    state = dict(state)
    if adapt is not None:
        state = adapt(state)
    own = module.state_dict()
    best = max(_candidates(state, set(own)), key=lambda s: len(set(s) & set(own)))
    matched = set(best) & set(own)
    if not matched:
        raise SegflowError(
            f"option encoder_weights: no tensor in {source} matches the encoder "
            f"(file keys like {sorted(state)[:3]}, encoder keys like {sorted(own)[:3]})."
        )
    wrong = [
        f"{k} {tuple(best[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(matched)
        if best[k].shape != own[k].shape
    ]
    if wrong:
        raise SegflowError(
            f"option encoder_weights: {len(wrong)} tensor(s) in {source} have the wrong shape for this encoder "
            f"(file vs model): {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}."
        )
    # nn.Module's own method: some SMP encoders override load_state_dict without a ``strict`` argument.
    nn.Module.load_state_dict(module, {k: best[k] for k in matched}, strict=False)
    missing = sorted(set(own) - matched)
    if missing:
        log.warning("encoder_weights: %d encoder tensor(s) not in %s keep their random initialisation (e.g. %s)",
                    len(missing), source, ", ".join(missing[:3]))
    log.info("loaded %d encoder tensors from %s", len(matched), source)


def init_encoder(
    model: SegmentationModel,
    encoder_weights: Any,
    imagenet: Callable[[], Mapping[str, Tensor]] | None = None,
) -> SegmentationModel:
    """Apply the ``encoder_weights`` option to ``model.encoder_module()``.

    ``imagenet`` returns the ImageNet state dict of the encoder (it may download); ``None`` when the
    architecture has no published ImageNet weights (its encoder is new in the paper).
    """
    kind = check_encoder_weights(encoder_weights)
    if kind == "none":
        return model
    encoder = model.encoder_module()
    if kind == "file":
        load_encoder_state(encoder, read_state_dict(encoder_weights), repr(str(encoder_weights)))
        return model
    if imagenet is None:
        raise pretrained_unavailable(type(model).__name__, "has no published ImageNet weights")
    try:
        state = imagenet()
    except Exception as exc:  # noqa: BLE001 - a download error becomes one paragraph
        raise pretrained_unavailable(f"the weights of {type(model).__name__}", f"cannot be had here ({exc})") from None
    load_encoder_state(encoder, state, "the ImageNet weights")
    return model


def pretrained_unavailable(what: str, reason: str) -> SegflowError:
    """The error for ``encoder_weights: imagenet`` that cannot be honoured."""
    return SegflowError(
        f"option encoder_weights='imagenet': {what} {reason}. Give a local weights file instead "
        "(encoder_weights: path/to/weights.safetensors or .pth), or encoder_weights: null to train from random "
        "initialisation.")


@functools.lru_cache(maxsize=8)
def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` can be opened (cached per process)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_guard() -> Iterator[None]:
    """Put the Hugging Face hub in offline mode while it cannot be reached.

    Cached files still load; a missing one fails at once instead of after ~30 s of retries.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - smp depends on huggingface_hub
        yield
        return
    if constants.HF_HUB_OFFLINE or host_reachable("huggingface.co"):
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def torchvision_state_dict(weights: Any) -> dict[str, Tensor]:
    """State dict of a torchvision ``WeightsEnum`` member (downloaded or from the torch hub cache)."""
    return weights.get_state_dict(progress=False, check_hash=False)


@torch.no_grad()
def init_output_bias(model: nn.Module, bias: Tensor) -> str | None:
    """Add ``bias`` (one value per class) to the bias of the layer that writes the model's class scores, and
    return that layer's name; None when no layer's bias reaches the scores unchanged (scores squashed by a
    non-linearity, say), and then nothing is changed.

    The layer is found by what it does, not by its name: the last layer with one output channel per class and a
    bias (auxiliary heads excepted) whose bias, shifted, shifts the model's eval-mode scores at every pixel by
    the same amount (away from the border, where an upsampling layer's kernel may sum to less than 1, as in FCN)."""
    num_classes = bias.numel()
    candidates = [(name, layer) for name, layer in model.named_modules()
                  if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and layer.out_channels == num_classes
                  and layer.bias is not None and "aux" not in name]
    was_training = model.training
    model.eval()
    side = 2 * max(32, getattr(model, "size_divisor", 32))
    probe = torch.zeros(1, 3, side, side, device=bias.device)
    inner = slice(side // 4, 3 * side // 4)
    try:
        before = model(probe)[..., inner, inner]
        for name, layer in reversed(candidates):
            original = layer.bias.clone()
            layer.bias += bias.to(layer.bias)
            shift = model(probe)[..., inner, inner] - before
            if torch.allclose(shift, bias.view(1, -1, 1, 1).expand_as(shift).to(shift), atol=1e-4, rtol=1e-3):
                return name
            layer.bias.copy_(original)
        return None
    finally:
        model.train(was_training)
