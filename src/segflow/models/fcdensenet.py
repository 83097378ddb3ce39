"""Jégou et al., "The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation", CVPRW 2017.

A 3x3 conv (48 channels), then five dense blocks each followed by a transition down (BN, ReLU, 1x1 conv,
dropout, 2x2 max pool), a bottleneck dense block, and five transition ups (3x3 transposed conv, stride 2)
each concatenated with the skip of its level and followed by a dense block; a 1x1 classifier. A dense layer
is BN, ReLU, 3x3 conv (growth rate k channels), dropout 0.2. On the way up only the features a block adds
are upsampled (to keep the widths in check), as in the paper. He-uniform initialisation.

* ``fcdensenet56``: k = 12, 4 layers in every block (~1.5M parameters);
* ``fcdensenet67``: k = 16, 5 layers in every block (~3.5M);
* ``fcdensenet103``: k = 16, blocks of 4, 5, 7, 10, 12 layers down, 15 at the bottom, 12, 10, 7, 5, 4 up (~9.4M).

Options: ``growth_rate`` (default: the paper's for the variant), ``dropout`` (0.2), ``encoder_weights`` (a
file for the down path; no ImageNet weights exist).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models.base import SegmentationModel, check_probability, init_encoder
from segflow.models.recipes import Recipe
from segflow.models.zoo import register

PAPER = (
    "Jégou et al., The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation, "
    "CVPR Workshops 2017"
)
RECIPE = Recipe(
    source="Jegou et al. 2017 §4.1: RMSprop, lr 1e-3 decayed x0.995 every epoch, weight decay 1e-4, from scratch",
    optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch="AdamW (RMSprop with momentum and bias correction) at the paper's 1e-3; poly instead of "
                 "x0.995 per epoch, which barely decays in 10 epochs",
)


class DenseLayer(nn.Sequential):
    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth_rate, 3, padding=1),
            nn.Dropout(dropout),
        )


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs.

    Returns the input concatenated with the new features, or only the new features (``new_only``).
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int, dropout: float,
                 new_only: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(num_layers)
        )
        self.new_only = new_only
        self.out_channels = growth_rate * num_layers + (0 if new_only else in_channels)

    def forward(self, x: Tensor) -> Tensor:
        new = []
        for layer in self.layers:
            out = layer(x)
            x = torch.cat([x, out], dim=1)
            new.append(out)
        return torch.cat(new, dim=1) if self.new_only else x


class TransitionDown(nn.Sequential):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.Dropout(dropout),
            nn.MaxPool2d(2, 2),
        )


def center_crop(x: Tensor, size: torch.Size) -> Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


class FCDenseNet(SegmentationModel):
    size_divisor = 32

    def __init__(self, num_classes: int, down: tuple[int, ...], bottleneck: int, up: tuple[int, ...],
                 growth_rate: int, first_channels: int = 48, dropout: float = 0.2) -> None:
        super().__init__()
        k = growth_rate
        self.encoder = nn.Module()
        self.encoder.first_conv = nn.Conv2d(3, first_channels, 3, padding=1)
        self.encoder.blocks = nn.ModuleList()
        self.encoder.transitions = nn.ModuleList()
        c = first_channels
        skip_channels = []
        for n in down:
            block = DenseBlock(c, k, n, dropout)
            c = block.out_channels
            self.encoder.blocks.append(block)
            self.encoder.transitions.append(TransitionDown(c, dropout))
            skip_channels.append(c)
        self.bottleneck = DenseBlock(c, k, bottleneck, dropout, new_only=True)
        c = self.bottleneck.out_channels
        self.transitions_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, (n, skip) in enumerate(zip(up, reversed(skip_channels), strict=True)):
            self.transitions_up.append(nn.ConvTranspose2d(c, c, 3, stride=2))
            block = DenseBlock(c + skip, k, n, dropout, new_only=i < len(up) - 1)
            self.up_blocks.append(block)
            c = block.out_channels
        self.classifier = nn.Conv2d(c, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _forward(self, x: Tensor) -> Tensor:
        x = self.encoder.first_conv(x)
        skips = []
        for block, transition in zip(self.encoder.blocks, self.encoder.transitions):
            x = block(x)
            skips.append(x)
            x = transition(x)
        x = self.bottleneck(x)
        for transition, block in zip(self.transitions_up, self.up_blocks):
            skip = skips.pop()
            x = center_crop(transition(x), skip.shape[-2:])  # 3x3 stride-2 "valid": 2n + 1 -> crop to 2n
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)


def _build(num_classes: int, layers: tuple[int, ...], growth_rate: Any, dropout: Any,
           encoder_weights: Any) -> nn.Module:
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise SegflowError(f"option growth_rate must be a positive integer; got {growth_rate!r}.")
    down, bottleneck, up = layers[:5], layers[5], layers[6:]
    model = FCDenseNet(num_classes, down, bottleneck, up, growth_rate, dropout=check_probability("dropout", dropout))
    return init_encoder(model, encoder_weights)


@register("fcdensenet56", family="fcdensenet", paper=PAPER, recipe=RECIPE)
def fcdensenet56(num_classes: int, *, growth_rate: int = 12, dropout: float = 0.2,
                 encoder_weights: Any = None) -> nn.Module:
    return _build(num_classes, (4,) * 11, growth_rate, dropout, encoder_weights)


@register("fcdensenet67", family="fcdensenet", paper=PAPER, recipe=RECIPE)
def fcdensenet67(num_classes: int, *, growth_rate: int = 16, dropout: float = 0.2,
                 encoder_weights: Any = None) -> nn.Module:
    return _build(num_classes, (5,) * 11, growth_rate, dropout, encoder_weights)


@register("fcdensenet103", family="fcdensenet", paper=PAPER, recipe=RECIPE)
def fcdensenet103(num_classes: int, *, growth_rate: int = 16, dropout: float = 0.2,
                  encoder_weights: Any = None) -> nn.Module:
    return _build(num_classes, (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4), growth_rate, dropout, encoder_weights)
