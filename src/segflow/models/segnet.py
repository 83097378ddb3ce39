"""Badrinarayanan et al., "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017.

``segnet``: encoder = the 13 convs of VGG-16 with batch norm (no fully connected layers), 2x2 max pools that
keep their indices; decoder = per stage max-unpooling with the encoder's indices followed by 3x3 conv + BN +
ReLU layers mirroring the encoder (the last one of a stage narrows to the stage below), and a final 3x3 conv
to the classes (SegNet's ``conv1_1_D``). ~29.5M parameters at ``width`` 1.0, as in the paper.

``segnet_basic``: the paper's smaller SegNet-Basic - 4 encoder layers (7x7 conv, 64 channels, BN, ReLU, 2x2
max pool with indices) and 4 decoder layers (unpool, 7x7 conv, BN, no ReLU), then a 1x1 classifier.

Options: ``width`` (channel multiplier), ``encoder_weights`` (ImageNet = torchvision's VGG-16-BN for
``segnet``; SegNet-Basic has none).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from segflow.models._vgg import VGG16_STAGES, VGG16Encoder
from segflow.models.base import SegmentationModel, channels, check_width, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = (
    "Badrinarayanan, Kendall & Cipolla, SegNet: A Deep Convolutional Encoder-Decoder Architecture for "
    "Image Segmentation, TPAMI 2017"
)
SOURCE = ("Badrinarayanan et al. 2017 §4.1 and the authors' Caffe solver: SGD, momentum 0.9, fixed lr 0.1, weight "
          "decay 5e-4, 12 images a batch, median frequency balancing, from scratch (SegNet-Basic)")
PAPER_SGD = ("the paper's SGD at a fixed 0.1 reached val mIoU 0.266 after 9 of 10 epochs (SegNet-Basic, CamVid 90x120, "
             "seed 0)")
RECIPE = Recipe(
    source=SOURCE, optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch=PAPER_SGD + "; AdamW at 2e-3 against 1e-3: val mIoU 0.270 / 0.297 against 0.267 / 0.252 (seeds "
                 "0 / 1, width 0.5); as for the papers that fine-tuned: " + SCRATCH_ADAMW,
)
BASIC_RECIPE = Recipe(
    source=SOURCE, optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch=PAPER_SGD + "; AdamW at 1e-3, whose val mIoU was 0.367 against 0.316 at 2e-3 (seed 0)",
)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
              nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNet(SegmentationModel):
    size_divisor = 32

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        pools = [nn.MaxPool2d(2, 2, return_indices=True) for _ in VGG16_STAGES]
        self.encoder = VGG16Encoder(width, batch_norm=True, pools=pools)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.decoder = nn.ModuleList()
        for s in reversed(range(len(VGG16_STAGES))):
            widths = [channels(c, width) for c in VGG16_STAGES[s]]
            if s > 0:
                outs = widths[:-1] + [channels(VGG16_STAGES[s - 1][-1], width)]
                layers = [conv_bn(c_in, c_out, 3) for c_in, c_out in zip(widths, outs)]
            else:  # conv1_2_D, then conv1_1_D straight to the classes
                layers = [conv_bn(widths[0], widths[0], 3), nn.Conv2d(widths[0], num_classes, 3, padding=1)]
            self.decoder.append(nn.Sequential(*layers))

    def _forward(self, x: Tensor) -> Tensor:
        stages = self.encoder.stages(x)
        x = stages[-1].out
        for stage, block in zip(reversed(stages), self.decoder):
            x = block(self.unpool(x, stage.indices, output_size=stage.size))
        return x


class SegNetBasic(SegmentationModel):
    size_divisor = 16

    def __init__(self, num_classes: int, width: float = 1.0, depth: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        c = channels(64, width)
        self.encoder = nn.ModuleList(conv_bn(3 if i == 0 else c, c, kernel_size) for i in range(depth))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.decoder = nn.ModuleList(conv_bn(c, c, kernel_size, relu=False) for _ in range(depth))
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def _forward(self, x: Tensor) -> Tensor:
        saved = []
        for layer in self.encoder:
            x = layer(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            saved.append((indices, size))
        for layer, (indices, size) in zip(self.decoder, reversed(saved)):
            x = layer(self.unpool(x, indices, output_size=size))
        return self.classifier(x)


@register("segnet", family="segnet", paper=PAPER, recipe=RECIPE)
def segnet(num_classes: int, *, width: float = 1.0, encoder_weights: Any = None) -> nn.Module:
    model = SegNet(num_classes, check_width(width))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)


@register("segnet_basic", family="segnet", paper=PAPER, recipe=BASIC_RECIPE)
def segnet_basic(num_classes: int, *, width: float = 1.0, encoder_weights: Any = None) -> nn.Module:
    return init_encoder(SegNetBasic(num_classes, check_width(width)), encoder_weights)
