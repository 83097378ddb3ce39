"""Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, ...", TPAMI 2017.

``deeplabv2``: ResNet-101 with the strides of its last two stages replaced by dilation 2 and 4 (output
stride 8) and ASPP-L: four parallel 3x3 convs from the backbone's features straight to the class scores,
dilated 6, 12, 18 and 24, summed; the logits are upsampled bilinearly. The CRF post-processing and the
multi-scale input fusion (MSC) of the paper's best model are not included.

Options: ``backbone`` (resnet18/34/50/101/152, default resnet101), ``output_stride`` (8 = paper, or 16),
``atrous_rates`` (6, 12, 18, 24), ``encoder_weights`` (ImageNet = torchvision's ResNet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models._resnet import dilated_resnet
from segflow.models.base import SegmentationModel, check_choice, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = (
    "Chen et al., DeepLab: Semantic Image Segmentation with Deep Convolutional Nets, Atrous Convolution, and "
    "Fully Connected CRFs, TPAMI 2017"
)
RECIPE = Recipe(
    source="Chen et al. 2017 §4: SGD, momentum 0.9, lr 2.5e-4 and 10x on the classifier, poly (power 0.9), "
           "weight decay 5e-4, 10 images a batch",
    optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly", new_layers_lr_mult=10.0,
    from_scratch=SCRATCH_ADAMW,
)


class ASPPSum(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab v2: parallel dilated 3x3 classifiers, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(SegmentationModel):
    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 8,
                 rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.encoder = dilated_resnet(backbone, output_stride)
        self.size_divisor = output_stride
        self.aspp = ASPPSum(self.encoder.channels[1], num_classes, rates)

    def _forward(self, x: Tensor) -> Tensor:
        return self.aspp(self.encoder(x)[1])


@register("deeplabv2", family="deeplabv2", paper=PAPER, recipe=RECIPE)
def deeplabv2(num_classes: int, *, backbone: str = "resnet101", output_stride: int = 8,
              atrous_rates: Sequence[int] = (6, 12, 18, 24), encoder_weights: Any = None) -> nn.Module:
    check_choice("output_stride", output_stride, (8, 16))
    if (isinstance(atrous_rates, (str, bytes)) or not atrous_rates
            or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in atrous_rates)):
        raise SegflowError(f"option atrous_rates must be a list of positive integers; got {atrous_rates!r}.")
    model = DeepLabV2(num_classes, backbone, output_stride, tuple(atrous_rates))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)
