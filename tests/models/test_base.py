"""Shared base: pad/crop, the aux convention, encoder weights from files and the offline ImageNet fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from zoo_testing import TINY, tiny

from segflow import models
from segflow.errors import SegflowError
from segflow.models import base
from segflow.models.base import SegmentationModel


class Probe(SegmentationModel):
    """Records the padded input; predicts at 1/4 resolution, aux at 1/8."""

    size_divisor = 16

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 2, 1)
        self.seen: torch.Size | None = None

    def _forward(self, x):
        self.seen = x.shape
        out = nn.functional.avg_pool2d(self.encoder(x), 4)
        return out, nn.functional.avg_pool2d(out, 2)


def test_pads_to_the_divisor_and_crops_back() -> None:
    model = Probe().eval()
    out = model(torch.randn(1, 3, 33, 50))
    assert model.seen == (1, 3, 48, 64)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 33, 50)
    model.train()
    out = model(torch.randn(1, 3, 32, 48))  # already divisible: no padding
    assert model.seen == (1, 3, 32, 48)
    assert set(out) == {"out", "aux"} and out["aux"].shape == out["out"].shape == (1, 2, 32, 48)


def test_padding_is_bottom_right_zeros() -> None:
    model = Probe().eval()
    captured = {}
    model._forward = lambda x: captured.setdefault("x", x)[:, :2]  # identity-like: logits = first 2 channels
    x = torch.randn(1, 3, 5, 7)
    out = model(x)
    assert torch.equal(out, x[:, :2])
    padded = captured["x"]
    assert padded.shape[-2:] == (16, 16) and padded[..., 5:, :].abs().sum() == 0 and padded[..., 7:].abs().sum() == 0


def _check_encoder_weights_file(tmp_path: Path, name: str, options: dict, fmt: str) -> None:
    """Save a fresh encoder's state with one recognisable tensor, build from that file, compare."""
    source = tiny(name, **options)
    state = {k: v.clone() for k, v in source.encoder_module().state_dict().items()}
    marked = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[marked] = torch.full_like(state[marked], 0.125)
    if fmt == "safetensors":
        path = tmp_path / "encoder.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "encoder.pth"
        prefix = "backbone." if fmt == "pth-prefixed" else ""
        torch.save({prefix + k: v for k, v in state.items()} | {"fc.weight": torch.zeros(2, 2)}, path)
    torch.manual_seed(123)  # a different random init
    model = models.build(name, 3, **{**TINY[name], **options}, encoder_weights=str(path))
    loaded = model.encoder_module().state_dict()
    assert torch.equal(loaded[marked], torch.full_like(loaded[marked], 0.125))
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", models.available())
def test_encoder_weights_from_a_file(tmp_path: Path, name: str) -> None:
    _check_encoder_weights_file(tmp_path, name, {}, "pth-prefixed")


@pytest.mark.parametrize(("name", "options"), [("unet", {}), ("unet", {"encoder_name": "tu-resnet18"}),
                                               ("fcn8s", {})])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_encoder_weights_file_formats(tmp_path: Path, name: str, options: dict, fmt: str) -> None:
    _check_encoder_weights_file(tmp_path, name, options, fmt)


def test_encoder_weights_that_do_not_fit(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"something.else": torch.zeros(3)}, wrong)
    with pytest.raises(SegflowError, match="encoder_weights"):
        models.build("fcn8s", 3, width=0.125, encoder_weights=str(wrong))
    state = tiny("fcn8s", width=0.25).encoder_module().state_dict()
    shaped = tmp_path / "shape.pth"
    torch.save(state, shaped)
    with pytest.raises(SegflowError, match="wrong shape"):
        models.build("fcn8s", 3, width=0.125, encoder_weights=str(shaped))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SegflowError, match="cannot read"):
        models.build("fcn8s", 3, width=0.125, encoder_weights=str(garbage))


def test_imagenet_weights_that_cannot_be_had_are_an_error_naming_the_fix() -> None:
    """Never a silent random initialisation in place of the pretrained weights asked for."""
    offline = not base.host_reachable("huggingface.co") and not base.host_reachable("download.pytorch.org")
    for name, options in [("unet", {}), ("unet", {"encoder_name": "tu-resnet18"}),
                          ("pspnet", {"backbone": "resnet18"})]:
        if not offline:  # pragma: no cover - this machine has no model hubs; with them the weights load
            assert models.build(name, 3, encoder_weights="imagenet", **options)
            continue
        with pytest.raises(SegflowError, match=r"encoder_weights='imagenet': .* cannot be had here .* "
                                               r"encoder_weights: null to train from random initialisation"):
            models.build(name, 3, encoder_weights="imagenet", **options)


def test_imagenet_needs_full_width() -> None:
    with pytest.raises(SegflowError, match="width"):
        models.build("fcn8s", 3, width=0.125, encoder_weights="imagenet")


def test_no_shared_tensors_so_safetensors_can_save(tmp_path: Path) -> None:
    for name in ["fcn8s", "pspnet", "unet"]:
        save_file(tiny(name).state_dict(), str(tmp_path / f"{name}.safetensors"))


@pytest.mark.parametrize("name", ["segnet", "fcn8s", "pspnet", "deeplabv3plus", "fcdensenet56", "deconvnet"])
def test_init_output_bias_shifts_every_pixels_scores_by_the_bias(name):
    model = tiny(name, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    bias = torch.tensor([1.5, -0.5, -1.0])
    layer = models.init_output_bias(model, bias)
    assert layer is not None and "aux" not in layer
    with torch.no_grad():
        shift = (model(x) - before)[..., 16:48, 16:48]  # FCN's bilinear upsampling sums to less at the border
    assert torch.allclose(shift, bias.view(1, 3, 1, 1).expand_as(shift), atol=1e-4)


class SquashedScores(SegmentationModel):
    """Class scores through a non-linearity: no bias shifts them by its own amount."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 3, 1)

    def _forward(self, x):
        return torch.tanh(self.encoder(x))


def test_init_output_bias_changes_nothing_where_no_bias_reaches_the_scores_unchanged():
    model = SquashedScores()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert models.init_output_bias(model, torch.tensor([1.5, -0.5, -1.0])) is None
    assert model.training  # the mode it was in
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
