"""DilatedNet front-end + context module (Yu & Koltun 2016)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import check_training_step, count_params, tiny

from segflow import models
from segflow.models.dilatednet import ContextModule


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
