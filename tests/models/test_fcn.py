"""FCN-32s/16s/8s (Long et al. 2015) and torchvision's FCN-ResNet50."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import count_params, tiny

from segflow import models
from segflow.models.fcn import FCN, bilinear_kernel, upsampler


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_param_count_matches_paper(name: str) -> None:
    assert count_params(name) == pytest.approx(134e6, rel=0.01)  # Table 1 of the paper: 134M for every variant


def test_width_scales_every_channel() -> None:
    model = tiny("fcn8s", width=0.125)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 512, 512]
    assert model.encoder.fc6.kernel_size == (7, 7) and model.encoder.fc7.kernel_size == (1, 1)


def test_skip_structure() -> None:
    m32, m16, m8 = tiny("fcn32s"), tiny("fcn16s"), tiny("fcn8s")
    assert not hasattr(m32, "score_pool4") and not hasattr(m32, "score_pool3")
    assert hasattr(m16, "score_pool4") and not hasattr(m16, "score_pool3")
    assert hasattr(m8, "score_pool4") and hasattr(m8, "score_pool3")
    assert m32.upscore.factor == 32 and m16.upscore.factor == 16 and m8.upscore.factor == 8
    assert torch.count_nonzero(m8.score_pool3.weight) == 0  # skip scores start at zero


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_upsampling_starts_bilinear(factor: int) -> None:
    up = upsampler(2, factor)
    x = torch.randn(1, 2, 4, 5)
    y = up(x)
    assert y.shape == (1, 2, 4 * factor, 5 * factor)
    # interior agrees with bilinear interpolation (align_corners=False) and channels do not mix
    ref = nn.functional.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(y[inner], ref[inner], atol=1e-5, rtol=1e-5)
    assert torch.equal(bilinear_kernel(2, 4)[0, 1], torch.zeros(4, 4))


def test_upsampling_learns_except_the_last() -> None:
    model = tiny("fcn8s")
    names = {n for n, _ in model.named_parameters()}
    assert {"upscore2.weight", "upscore_pool4.weight"} <= names
    assert not any(n.startswith("upscore.") for n in names)


def test_fc_weights_from_a_vgg_classifier() -> None:
    """A torchvision VGG state dict (classifier.0/.3 as Linear) loads into fc6/fc7 convolutions."""
    encoder = FCN(3, 8, width=0.125).encoder
    fc6 = torch.randn(512, 64 * 7 * 7)
    fc7 = torch.randn(512, 512)
    state = {"classifier.0.weight": fc6, "classifier.0.bias": torch.randn(512),
             "classifier.3.weight": fc7, "classifier.3.bias": torch.randn(512)}
    adapted = encoder.adapt_state_dict(state)
    torch.testing.assert_close(adapted["fc6.weight"], fc6.view(512, 64, 7, 7))
    torch.testing.assert_close(adapted["fc7.weight"], fc7.view(512, 512, 1, 1))


def test_fcn_resnet50() -> None:
    info = models.describe("fcn_resnet50")
    assert info.aux and info.default_options["aux"] is True
    assert count_params("fcn_resnet50") == pytest.approx(35.3e6, rel=0.01)  # torchvision's figure with aux
    no_aux = tiny("fcn_resnet50", aux=False).train()
    assert no_aux(torch.randn(2, 3, 17, 23)).shape == (2, 3, 17, 23)


@pytest.mark.parametrize("name", ["fcn32s", "fcn8s"])
def test_batch_norm_after_every_conv_by_default_and_none_in_the_papers_network(name: str) -> None:
    convs = sum(isinstance(m, nn.Conv2d) for m in tiny(name).encoder.modules())  # 13 convs, fc6, fc7
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tiny(name).modules()) == convs == 15
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tiny(name, batch_norm=False).modules())
