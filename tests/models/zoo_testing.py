"""Shared helpers for the model-zoo tests: small configurations that run in seconds on two CPU cores."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segflow import models

# The cheapest faithful configuration of every registered model (resnet18 encoders, width 1/8 VGGs, ...).
TINY: dict[str, dict[str, Any]] = {
    "unet": {}, "unetplusplus": {}, "deeplabv3": {}, "deeplabv3plus": {}, "fpn": {}, "pan": {}, "linknet": {},
    "manet": {}, "upernet": {}, "segformer": {},
    "pspnet": {"backbone": "resnet18"},
    "fcn32s": {"width": 0.125}, "fcn16s": {"width": 0.125}, "fcn8s": {"width": 0.125},
    "fcn_resnet50": {},
    "deconvnet": {"width": 0.125}, "segnet": {"width": 0.125}, "segnet_basic": {"width": 0.25},
    "unet_original": {"width": 0.125},
    "fcdensenet56": {}, "fcdensenet67": {"growth_rate": 4}, "fcdensenet103": {"growth_rate": 4},
    "deeplabv1_largefov": {"width": 0.125}, "dilatednet": {"width": 0.125}, "deeplabv2": {"backbone": "resnet18"},
}

AUX_WEIGHT = 0.4


def tiny(name: str, num_classes: int = 3, **options: Any) -> nn.Module:
    torch.manual_seed(0)
    return models.build(name, num_classes, **{**TINY[name], **options})


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def loss_of(output: torch.Tensor | dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    if isinstance(output, dict):
        return F.cross_entropy(output["out"], target) + AUX_WEIGHT * F.cross_entropy(output["aux"], target)
    return F.cross_entropy(output, target)


def check_training_step(model: nn.Module, size: tuple[int, int] = (35, 47), num_classes: int = 3,
                        lr: float = 1e-5) -> None:
    """Gradients reach the first conv and one Adam step lowers the loss on a fixed batch."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    y = torch.randint(0, num_classes, (2, *size))
    model.train()

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks before and after the step
        return loss_of(model(x), y)

    output = model(x)
    if isinstance(output, dict):  # the auxiliary head must train the backbone too
        model.zero_grad()
        F.cross_entropy(output["aux"], y).backward()
        grad = first_conv(model).weight.grad
        assert grad is not None and grad.abs().sum() > 0, "the aux loss does not reach the first conv layer"
        model.zero_grad()

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    before = loss()
    before.backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0, "no gradient reaches the first conv layer"
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before, f"loss did not decrease: {before.item():.5f} -> {after.item():.5f}"


def count_params(name: str, num_classes: int = 21, **options: Any) -> int:
    """Parameter count without allocating or initialising anything (built on the meta device)."""
    with torch.device("meta"):
        model = models.build(name, num_classes, **options)
    return sum(p.numel() for p in model.parameters())


def count_unpool_calls(model: nn.Module, size: tuple[int, int] = (32, 32)) -> int:
    """Run ``model.unpool`` via a forward pass; check every call re-uses pooling indices (3 zeros in 4)."""
    calls = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls.append((output == 0).float().mean().item())

    handle = model.unpool.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, *size))
    finally:
        handle.remove()
    assert all(zeros >= 0.75 for zeros in calls), calls
    return len(calls)
