"""DeconvNet (Noh et al. 2015)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import count_params, count_unpool_calls, tiny


def test_param_count_matches_paper() -> None:
    assert count_params("deconvnet") == pytest.approx(252e6, rel=0.01)  # paper: 252M


def test_mirrored_structure() -> None:
    model = tiny("deconvnet", width=0.125)
    encoder_convs = [m for m in model.encoder.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.encoder.features if isinstance(m, nn.MaxPool2d)]
    assert len(encoder_convs) == 13 and all(p.return_indices for p in pools) and len(pools) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder.features) == 13
    assert model.encoder.fc6.kernel_size == (7, 7) and model.encoder.fc7.kernel_size == (1, 1)
    assert model.encoder.fc6.out_channels == 512  # 4096 * 0.125
    assert model.deconv_fc6[0].kernel_size == (7, 7) and isinstance(model.deconv_fc6[0], nn.ConvTranspose2d)
    deconvs = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 13
    assert [d.in_channels for d in deconvs] == [c.out_channels for c in reversed(encoder_convs)]


def test_unpooling_uses_the_encoder_indices() -> None:
    """A pool -> unpool round trip puts each maximum back where it came from (and zeros elsewhere)."""
    model = tiny("deconvnet")
    x = torch.randn(1, 2, 8, 8)
    pooled, indices = nn.MaxPool2d(2, 2, return_indices=True)(x)
    restored = model.unpool(pooled, indices, output_size=x.shape[-2:])
    mask = restored != 0
    assert mask.sum() == pooled.numel() and torch.equal(restored[mask], x[mask])


def test_decoder_unpools_with_the_pooling_indices() -> None:
    assert count_unpool_calls(tiny("deconvnet")) == 5
