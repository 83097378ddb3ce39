"""PSPNet (Zhao et al. 2017)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_testing import check_training_step, count_params, tiny

from segflow import models


def test_aux_only_in_training_mode() -> None:
    model = tiny("pspnet")
    x = torch.randn(2, 3, 41, 27)
    out = model.train()(x)
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 3, 41, 27)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 41, 27)
    no_aux = tiny("pspnet", aux=False).train()
    assert no_aux.aux_head is None and no_aux(x).shape == (2, 3, 41, 27)


@pytest.mark.parametrize(("backbone", "stride"), [("resnet18", 8), ("resnet18", 16), ("resnet50", 8)])
def test_dilated_backbone(backbone: str, stride: int) -> None:
    model = tiny("pspnet", backbone=backbone, output_stride=stride).eval()
    with torch.no_grad():
        c3, c4 = model.encoder(torch.randn(1, 3, 64, 64))
    assert c3.shape[-1] == 64 // min(stride, 16) and c4.shape[-1] == 64 // stride
    assert c4.shape[1] == (2048 if backbone == "resnet50" else 512)


def test_pyramid_pooling_module() -> None:
    model = tiny("pspnet", backbone="resnet50")
    ppm = model.ppm
    assert [s[0].output_size for s in ppm.stages] == [1, 2, 3, 6]
    for stage in ppm.stages:  # 1x1 conv to 1/4 of the channels + BN + ReLU
        conv, bn, relu = stage[1], stage[2], stage[3]
        assert conv.kernel_size == (1, 1) and conv.in_channels == 2048 and conv.out_channels == 512
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    assert model.head[0][0].kernel_size == (3, 3) and model.head[0][0].in_channels == 4096
    assert model.aux_head[0][0].in_channels == 1024  # stage 4 = layer3


def test_default_backbone_is_resnet50() -> None:
    assert models.describe("pspnet").default_options["backbone"] == "resnet50"
    # ResNet-50 without fc (23.5M) + PPM 4 x 1x1 2048->512 (4.2M) + 3x3 4096->512 head (18.9M) + aux (2.4M)
    assert count_params("pspnet") == pytest.approx(48.96e6, rel=0.005)


def test_resnet50_trains() -> None:
    check_training_step(tiny("pspnet", backbone="resnet50"), size=(24, 24))
