"""Dilated torchvision ResNet backbone shared by PSPNet and DeepLab v2 (He et al., CVPR 2016)."""

from __future__ import annotations

from collections.abc import Mapping

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from segflow.errors import SegflowError
from segflow.models.base import check_choice, torchvision_state_dict

_SPECS: dict[str, tuple[type[nn.Module], list[int], str]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], "ResNet18_Weights"),
    "resnet34": (BasicBlock, [3, 4, 6, 3], "ResNet34_Weights"),
    "resnet50": (Bottleneck, [3, 4, 6, 3], "ResNet50_Weights"),
    "resnet101": (Bottleneck, [3, 4, 23, 3], "ResNet101_Weights"),
    "resnet152": (Bottleneck, [3, 8, 36, 3], "ResNet152_Weights"),
}
BACKBONES = tuple(_SPECS)


class DilatedResNet(ResNet):
    """torchvision ResNet without ``avgpool``/``fc``, strides of the last stages replaced by dilation.

    Bottleneck nets use torchvision's ``replace_stride_with_dilation``; BasicBlock nets (ResNet-18/34, which
    torchvision does not dilate) get the same change here: the stage's stride-2 convs become stride 1 and its
    3x3 convs dilation d. Parameter names are torchvision's, so ImageNet state dicts load as they are.
    ``forward`` returns ``(layer3, layer4)`` features.
    """

    def __init__(self, name: str, output_stride: int = 8) -> None:
        check_choice("backbone", name, BACKBONES)
        check_choice("output_stride", output_stride, (8, 16, 32))
        block, layers, self.weights_name = _SPECS[name]
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
        if block is Bottleneck:
            super().__init__(block, layers, replace_stride_with_dilation=dilate)
        else:
            super().__init__(block, layers)
            dilation = 1
            for stage, on in zip((self.layer2, self.layer3, self.layer4), dilate):
                if on:
                    dilation *= 2
                    _dilate(stage, dilation)
        del self.avgpool, self.fc
        self.name = name
        self.output_stride = output_stride
        self.channels = (self.inplanes // 2, self.inplanes)  # widths of the (layer3, layer4) features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)

    def imagenet_state_dict(self) -> Mapping[str, Tensor]:
        return torchvision_state_dict(getattr(torchvision.models, self.weights_name).IMAGENET1K_V1)


def _dilate(stage: nn.Module, dilation: int) -> None:
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def dilated_resnet(name: str, output_stride: int) -> DilatedResNet:
    if not isinstance(name, str):
        raise SegflowError(f"option backbone must be one of {', '.join(BACKBONES)}; got {name!r}.")
    return DilatedResNet(name, output_stride)
