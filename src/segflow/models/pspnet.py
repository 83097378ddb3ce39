"""Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017.

Dilated ResNet backbone (torchvision; output stride 8 by default) -> pyramid pooling module (bins 1, 2, 3, 6;
each a 1x1 conv + BN + ReLU down to 1/4 of the backbone's channels, upsampled bilinearly and concatenated with
the backbone features) -> 3x3 conv (512) + BN + ReLU + dropout -> 1x1 classifier; logits are upsampled
bilinearly to the input size. In training mode an auxiliary FCN head on stage 4 (``layer3``) is returned as
``"aux"`` (its loss weight, 0.4 in the paper, belongs to the training loop). Batch norm on the 1x1 pooled
bin needs a training batch of at least 2.

Options: ``backbone`` (resnet18/34/50/101/152, default resnet50), ``output_stride`` (8 or 16),
``aux`` (default True), ``dropout`` (0.1), ``encoder_weights``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models._resnet import dilated_resnet
from segflow.models.base import SegmentationModel, check_choice, check_probability, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = "Zhao et al., Pyramid Scene Parsing Network, CVPR 2017"
RECIPE = Recipe(
    source="Zhao et al. 2017 §5.1: SGD, momentum 0.9, lr 0.01, poly (power 0.9), weight decay 1e-4, 16 images a "
           "batch, auxiliary loss weight 0.4; new layers at 10x over the ImageNet ResNet (MMSegmentation: 1x)",
    optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_schedule="poly", new_layers_lr_mult=10.0, aux_weight=0.4,
    from_scratch=SCRATCH_ADAMW + "; at 1e-3 for PSPNet, whose val mIoU was 0.445 at 1e-3 against 0.408 at 2e-3 "
                 "(ResNet-18, output stride 8)",
)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Average-pool to each bin size, reduce channels, upsample, concatenate with the input."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_channels, reduced, 1)) for b in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return torch.cat([x, *pooled], dim=1)


def fcn_head(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        conv_bn_relu(in_channels, mid_channels, 3), nn.Dropout2d(dropout), nn.Conv2d(mid_channels, num_classes, 1)
    )


class PSPNet(SegmentationModel):
    def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 8, aux: bool = True,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = dilated_resnet(backbone, output_stride)
        self.size_divisor = output_stride
        c3, c4 = self.encoder.channels
        self.ppm = PyramidPooling(c4)
        self.head = fcn_head(self.ppm.out_channels, 512, num_classes, dropout)
        self.aux_head = fcn_head(c3, 256, num_classes, dropout) if aux else None

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        c3, c4 = self.encoder(x)
        out = self.head(self.ppm(c4))
        aux = self.aux_head(c3) if self.training and self.aux_head is not None else None
        return out, aux


@register("pspnet", family="pspnet", paper=PAPER, recipe=RECIPE, aux=True)
def pspnet(num_classes: int, *, backbone: str = "resnet50", output_stride: int = 8, aux: bool = True,
           dropout: float = 0.1, encoder_weights: Any = None) -> nn.Module:
    check_choice("output_stride", output_stride, (8, 16))
    if not isinstance(aux, bool):
        raise SegflowError(f"option aux must be true or false; got {aux!r}.")
    model = PSPNet(num_classes, backbone, output_stride, aux, check_probability("dropout", dropout))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)
