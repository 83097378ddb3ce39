"""DeepLab v1 LargeFOV (Chen et al. 2015)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import count_params, tiny

from segflow.models.deeplabv1 import DeepLabV1


def test_param_count_matches_paper() -> None:
    assert count_params("deeplabv1_largefov") == pytest.approx(20.5e6, rel=0.005)  # paper: 20.5M


def test_structure_and_output_stride() -> None:
    model = tiny("deeplabv1_largefov").eval()
    pools = [m for m in model.encoder.features if isinstance(m, nn.MaxPool2d)]
    assert [p.stride for p in pools] == [2, 2, 2, 1, 1] and all(p.kernel_size == 3 for p in pools)
    conv5 = [m for m in model.encoder.features if isinstance(m, nn.Conv2d)][-3:]
    assert all(c.dilation == (2, 2) for c in conv5)
    fc6 = model.encoder.fc6
    assert fc6.kernel_size == (3, 3) and fc6.dilation == (12, 12)
    assert tiny("deeplabv1_largefov", width=1.0).encoder.fc6.out_channels == 1024
    with torch.no_grad():
        assert model.fc8(model.encoder(torch.randn(1, 3, 64, 48))).shape[-2:] == (8, 6)


def test_imagenet_fc_layers_are_subsampled() -> None:
    encoder = DeepLabV1(3, width=0.125).encoder  # fc6: 64 -> 128 channels, 3x3
    fc6, fc7 = torch.randn(512, 64 * 7 * 7), torch.randn(512, 512)
    adapted = encoder.adapt_state_dict({"classifier.0.weight": fc6, "classifier.0.bias": torch.randn(512),
                                        "classifier.3.weight": fc7, "classifier.3.bias": torch.randn(512)})
    assert adapted["fc6.weight"].shape == encoder.fc6.weight.shape
    torch.testing.assert_close(adapted["fc6.weight"], fc6.view(512, 64, 7, 7)[::4, :, ::3, ::3])
    torch.testing.assert_close(adapted["fc7.weight"], fc7.view(512, 512, 1, 1)[::4, ::4])


def test_batch_norm_after_every_conv_by_default_and_none_in_the_papers_network() -> None:
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tiny("deeplabv1_largefov").modules()) == 15
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tiny("deeplabv1_largefov", batch_norm=False).modules())
