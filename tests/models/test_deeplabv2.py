"""DeepLab v2 (Chen et al. 2017)."""

from __future__ import annotations

import pytest
import torch
from zoo_testing import count_params, tiny

from segflow import models


def test_defaults_follow_the_paper() -> None:
    options = models.describe("deeplabv2").default_options
    assert options["backbone"] == "resnet101" and options["output_stride"] == 8
    assert tuple(options["atrous_rates"]) == (6, 12, 18, 24)
    # ResNet-101 without fc (42.5M) + four 3x3 2048 -> 21 classifiers (1.5M)
    assert count_params("deeplabv2") == pytest.approx(44.05e6, rel=0.005)


def test_aspp_branches_are_summed() -> None:
    model = tiny("deeplabv2").eval()
    assert [b.dilation[0] for b in model.aspp.branches] == [6, 12, 18, 24]
    assert all(b.out_channels == 3 for b in model.aspp.branches)
    features = torch.randn(1, 512, 5, 7)
    with torch.no_grad():
        expected = sum(branch(features) for branch in model.aspp.branches)
        torch.testing.assert_close(model.aspp(features), expected)
        c3, c4 = model.encoder(torch.randn(1, 3, 64, 48))
    assert c4.shape[-2:] == (8, 6)  # output stride 8


def test_output_stride_16() -> None:
    model = tiny("deeplabv2", output_stride=16).eval()
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 64, 48))[1].shape[-2:] == (4, 3)
        assert model(torch.randn(1, 3, 21, 30)).shape == (1, 3, 21, 30)
