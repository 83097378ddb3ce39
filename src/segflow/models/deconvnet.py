"""Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015.

Encoder: VGG-16 with batch norm after every conv, 2x2 max pools that keep their indices, fc6 (7x7, 4096) and
fc7 (1x1, 4096) as convolutions with BN + ReLU. Decoder, the mirror image: a 7x7 deconvolution back to 512
channels, then per stage max-unpooling with the encoder's indices followed by 3x3 deconvolutions (BN + ReLU)
that mirror the encoder's convs, and a 1x1 classifier. ~252M parameters at ``width`` 1.0 (as in the paper).
Difference: the paper's fc6 is "valid" on a 7x7 pool5 map (224 x 224 crops, instance-wise); here fc6 and its
mirror are padded "same" so any input works (the base pads it to a multiple of 32).

Options: ``width`` (channel multiplier, 1.0 = paper), ``encoder_weights`` (ImageNet = torchvision's VGG-16-BN,
fc6/fc7 reshaped from its classifier).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from segflow.models._vgg import VGG16_STAGES, VGG16Encoder
from segflow.models.base import SegmentationModel, channels, check_width, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = "Noh, Hong & Han, Learning Deconvolution Network for Semantic Segmentation, ICCV 2015"
RECIPE = Recipe(
    source="Noh et al. 2015 §4.1: SGD, momentum 0.9, lr 0.01, weight decay 5e-4, 64 images a batch, batch norm",
    optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch=SCRATCH_ADAMW,
)


def deconv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DeconvNet(SegmentationModel):
    size_divisor = 32

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        pools = [nn.MaxPool2d(2, 2, return_indices=True) for _ in VGG16_STAGES]
        self.encoder = VGG16Encoder(width, batch_norm=True, pools=pools, fc=(4096, 7, 1), fc_dropout=0.0)
        top = self.encoder.stage_channels[-1]
        self.deconv_fc6 = deconv_bn_relu(self.encoder.out_channels, top, 7)
        self.unpool = nn.MaxUnpool2d(2, 2)
        # Stage s of the decoder mirrors encoder stage s: same number of layers, the last one narrows to the
        # width of the stage below (64 -> 64 at the bottom).
        self.decoder = nn.ModuleList()
        for s in reversed(range(len(VGG16_STAGES))):
            widths = [channels(c, width) for c in VGG16_STAGES[s]]
            below = channels(VGG16_STAGES[s - 1][-1], width) if s > 0 else widths[0]
            outs = widths[:-1] + [below]
            layers, c_in = [], widths[-1]
            for c_out in outs:
                layers.append(deconv_bn_relu(c_in, c_out))
                c_in = c_out
            self.decoder.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(c_in, num_classes, 1)

    def _forward(self, x: Tensor) -> Tensor:
        stages = self.encoder.stages(x)
        x = self.deconv_fc6(self.encoder.fc(stages[-1].out))
        for stage, block in zip(reversed(stages), self.decoder):
            x = block(self.unpool(x, stage.indices, output_size=stage.size))
        return self.classifier(x)


@register("deconvnet", family="deconvnet", paper=PAPER, recipe=RECIPE)
def deconvnet(num_classes: int, *, width: float = 1.0, encoder_weights: Any = None) -> nn.Module:
    model = DeconvNet(num_classes, check_width(width))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)
