"""segmentation-models-pytorch architectures under the zoo's conventions."""

from __future__ import annotations

import pytest
import torch
from zoo_testing import check_training_step, tiny

from segflow import models
from segflow.models.smp import SMPModel

SMP_NAMES = ["unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn", "pan", "linknet", "manet", "upernet",
             "segformer"]


@pytest.mark.parametrize("name", SMP_NAMES)
def test_family_and_defaults(name: str) -> None:
    info = models.describe(name)
    assert info.family == "smp" and not info.aux
    expected = "mit_b0" if name == "segformer" else "resnet18"
    assert info.default_options["encoder_name"] == expected
    model = tiny(name)
    assert isinstance(model, SMPModel)
    assert type(model.net.encoder).__name__ in ("ResNetEncoder", "MixVisionTransformerEncoder")


def test_timm_encoder() -> None:
    model = tiny("fpn", encoder_name="tu-resnet18").eval()
    assert type(model.net.encoder).__name__ == "TimmUniversalEncoder"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 45, 29)).shape == (1, 3, 45, 29)
    check_training_step(tiny("unet", encoder_name="tu-resnet18"))


@pytest.mark.parametrize(("name", "stride", "rates"), [("deeplabv3", 16, (6, 12, 18)), ("deeplabv3", 8, (12, 24, 36)),
                                                      ("deeplabv3plus", 16, (6, 12, 18))])
def test_deeplab_output_stride_and_paper_rates(name: str, stride: int, rates: tuple) -> None:
    model = tiny(name, output_stride=stride)
    assert model.net.encoder.output_stride == stride
    convs = [m for m in model.net.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1]
    assert sorted({m.dilation[0] for m in convs}) == list(rates)
    pools = [m for m in model.net.decoder.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    assert pools, "ASPP image-level pooling branch"


def test_custom_atrous_rates() -> None:
    model = tiny("deeplabv3", atrous_rates=[2, 4, 6])
    assert {m.dilation[0] for m in model.net.decoder.modules() if isinstance(m, torch.nn.Conv2d)} == {1, 2, 4, 6}
