"""Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015.

``unet_original``: the paper's network rather than SMP's encoder-swappable ``unet``. Contracting path of four
levels (two 3x3 conv + ReLU, 2x2 max pool) from 64 to 512 channels and a 1024-channel bottom, dropout at the
end of the contracting path, expanding path of 2x2 up-convolutions halving the channels, concatenation with
the matching contracting feature map, two 3x3 conv + ReLU, and a 1x1 classifier; He-normal initialisation.
~31.0M parameters at ``width`` 1.0. Difference: convs are padded ("same"), so no cropping of the skips and the
output is the size of the input (the paper's unpadded convs shrink it by 184 pixels).

Options: ``width`` (channel multiplier, 1.0 = 64..1024), ``batch_norm`` (default true: BN after every conv, the
from-scratch change that lets it train in a few epochs; false is the paper's network), ``dropout`` (0.5),
``encoder_weights`` (a file for the contracting path; no ImageNet weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from segflow.models.base import SegmentationModel, channels, check_flag, check_probability, check_width, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = "Ronneberger, Fischer & Brox, U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015"
RECIPE = Recipe(
    source="Ronneberger et al. 2015 §3: SGD (Caffe), momentum 0.99, one large tile a batch",
    optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch="momentum 0.99 averages over the paper's one-tile batches; with batches of 8 and batch norm "
                 "(option batch_norm), AdamW at 2e-3 with poly decay, as for the others: " + SCRATCH_ADAMW,
)


def double_conv(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNetOriginal(SegmentationModel):
    size_divisor = 16

    def __init__(self, num_classes: int, width: float = 1.0, batch_norm: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        widths = [channels(c, width) for c in (64, 128, 256, 512, 1024)]
        self.encoder = nn.ModuleList()
        c_in = 3
        for c in widths:
            self.encoder.append(double_conv(c_in, c, batch_norm))
            c_in = c
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for c in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_in, c, 2, stride=2))
            self.decoder.append(double_conv(2 * c, c, batch_norm))
            c_in = c
        self.classifier = nn.Conv2d(c_in, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # std sqrt(2 / fan_in), as in the paper
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, level in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = level(x)
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, level in zip(self.up, self.decoder):
            x = level(torch.cat([skips.pop(), up(x)], dim=1))
        return self.classifier(x)


@register("unet_original", family="unet_original", paper=PAPER, recipe=RECIPE)
def unet_original(num_classes: int, *, width: float = 1.0, batch_norm: bool = True, dropout: float = 0.5,
                  encoder_weights: Any = None) -> nn.Module:
    model = UNetOriginal(num_classes, check_width(width), check_flag("batch_norm", batch_norm),
                         check_probability("dropout", dropout))
    return init_encoder(model, encoder_weights)
