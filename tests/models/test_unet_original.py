"""The original U-Net (Ronneberger et al. 2015)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import check_training_step, count_params, tiny


def test_param_count_matches_paper() -> None:
    assert count_params("unet_original", 2) == pytest.approx(31.03e6, rel=0.005)  # ~31.0M


def test_structure() -> None:
    model = tiny("unet_original", width=1.0, batch_norm=False)  # the paper's network
    assert [level[0].out_channels for level in model.encoder] == [64, 128, 256, 512, 1024]
    assert all(isinstance(up, nn.ConvTranspose2d) and up.kernel_size == (2, 2) and up.stride == (2, 2)
               for up in model.up)
    assert [level[0].in_channels for level in model.decoder] == [1024, 512, 256, 128]  # concatenated skips
    assert all(c.padding == (1, 1) for c in model.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_batch_norm_is_the_default() -> None:
    model = tiny("unet_original")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    check_training_step(model)


def test_output_follows_the_input_size() -> None:
    model = tiny("unet_original").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)
        assert model(torch.randn(1, 3, 100, 17)).shape == (1, 3, 100, 17)
