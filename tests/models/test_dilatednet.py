"""DilatedNet front-end + context module (Yu & Koltun 2016)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import check_training_step, count_params, tiny

from segflow import models
from segflow.models.dilatednet import ContextModule
from segflow.training.optim import build_optimizer


def test_front_end() -> None:
    model = tiny("dilatednet")
    pools = [m for m in model.encoder.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # pool4 and pool5 removed
    conv5 = [m for m in model.encoder.features if isinstance(m, nn.Conv2d)][-3:]
    assert all(c.dilation == (2, 2) for c in conv5)
    assert model.encoder.fc6.kernel_size == (7, 7) and model.encoder.fc6.dilation == (4, 4)
    model.eval()
    with torch.no_grad():
        assert model.final(model.encoder(torch.randn(1, 3, 64, 40))).shape[-2:] == (8, 5)
    assert count_params("dilatednet", context="none") == pytest.approx(134.3e6, rel=0.005)  # VGG-16 sized


def test_basic_context_is_identity_initialised() -> None:
    context = ContextModule(5, large=False)
    dilations = [m.dilation[0] for m in context.modules() if isinstance(m, nn.Conv2d)]
    assert dilations == [1, 1, 2, 4, 8, 16, 1, 1]
    x = torch.randn(2, 5, 9, 11)
    torch.testing.assert_close(context(x), torch.relu(x))


def test_large_context_starts_close_to_identity() -> None:
    torch.manual_seed(0)
    context = ContextModule(4, large=True)
    widths = [m.out_channels for m in context.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 8, 16, 32, 64, 128, 128, 4]
    x = torch.randn(2, 4, 12, 12)
    torch.testing.assert_close(context(x), torch.relu(x), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("context", ["basic", "none"])
def test_context_options(context: str) -> None:
    model = tiny("dilatednet", context=context)
    assert (model.context is None) == (context == "none")
    check_training_step(model)
    assert models.describe("dilatednet").default_options["context"] == "large"


def test_the_context_module_passes_on_scores_that_are_all_below_zero() -> None:
    """Cross entropy leaves the scores' level free; the module sees them shifted to a minimum of 0, so at its
    identity initialisation the network predicts what the front end predicts, wherever the scores lie."""
    model = tiny("dilatednet", context="basic", num_classes=4).eval()
    with torch.no_grad():
        model.final.bias.fill_(-100.0)  # every class score far below zero
        x = torch.randn(2, 3, 32, 32)
        front_end = model.final(model.encoder(x))
        assert (front_end < 0).all()
        out = model._forward(x)
    torch.testing.assert_close(out, front_end - front_end.amin(dim=1, keepdim=True))
    assert out.argmax(1).unique().numel() > 1  # not the constant class that the ReLUs on raw scores gave


def test_the_context_module_trains_slower_than_the_front_end() -> None:
    """Adam's steps ignore a weight's size; at the recipe's rate they erase the large module's identity."""
    model = tiny("dilatednet")
    recipe = models.recipe("dilatednet")
    optimizer = build_optimizer(recipe, model, torch.device("cpu"), encoder_loaded=False)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert {lr_of[id(p)] for p in model.context.parameters()} == {recipe.lr / 100}
    assert {lr_of[id(p)] for p in model.encoder.parameters()} == {recipe.lr}
