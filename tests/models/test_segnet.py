"""SegNet and SegNet-Basic (Badrinarayanan et al. 2017)."""

from __future__ import annotations

import pytest
from torch import nn
from zoo_testing import count_params, count_unpool_calls, tiny


def test_segnet_param_count_matches_paper() -> None:
    assert count_params("segnet", 11) == pytest.approx(29.5e6, rel=0.005)  # paper: 29.5M


def test_segnet_basic_param_count_matches_paper() -> None:
    assert count_params("segnet_basic", 11) == pytest.approx(1.425e6, rel=0.01)  # paper: 1.425M


def test_segnet_structure() -> None:
    model = tiny("segnet", width=1.0)
    encoder_convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(encoder_convs) == 13 and model.encoder.fc6 is None  # no fully connected layers
    pools = [m for m in model.encoder.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.return_indices for p in pools)
    decoder_convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(decoder_convs) == 13
    assert [c.in_channels for c in decoder_convs] == [c.out_channels for c in reversed(encoder_convs)]
    assert decoder_convs[-1].out_channels == 3 and decoder_convs[-1].kernel_size == (3, 3)


def test_segnet_basic_structure() -> None:
    model = tiny("segnet_basic", width=1.0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9  # 4 encoder + 4 decoder + 1x1 classifier
    assert all(c.kernel_size == (7, 7) and c.out_channels == 64 for c in convs[:8])
    assert not any(isinstance(m, nn.ReLU) for m in model.decoder.modules())  # decoders have no ReLU
    assert sum(isinstance(m, nn.ReLU) for m in model.encoder.modules()) == 4


def test_decoders_upsample_with_the_pooling_indices() -> None:
    assert count_unpool_calls(tiny("segnet")) == 5
    assert count_unpool_calls(tiny("segnet_basic")) == 4
