"""Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", ICLR 2016.

``dilatednet``: the front-end - VGG-16 with pool4 and pool5 removed, conv5 dilated by 2, fc6 a 7x7 conv
dilated by 4 (4096 channels), fc7 1x1 (4096), both with ReLU and dropout, and a 1x1 classifier; output stride
8 - followed by the context module on the class scores: seven 3x3 convs with dilations 1, 1, 2, 4, 8, 16, 1,
each followed by ReLU, and a 1x1 output conv. ``context="basic"`` keeps C = num_classes channels throughout
and is identity-initialised; ``"large"`` widens to 2C, 2C, 4C, 8C, 16C, 32C, 32C with the paper's
generalised identity initialisation (plus N(0, 1e-3) noise); ``"none"`` is the front-end alone. Logits are
upsampled bilinearly. Difference: convs are padded "same" instead of reflection-padding the input by 186
pixels and running unpadded.

From scratch, two changes: the module sees each pixel's scores minus their minimum over the classes, and the
front end has batch norm (option). Cross entropy leaves the level of the scores free; trained jointly from random
init (the paper trained the front end first, then the module on its output), the scores drift below zero, the
module's ReLUs pass nothing and the network predicts one class everywhere. Shifted, the scores are non-negative, the
identity-initialised module passes them on, and the loss is unchanged (softmax is shift invariant). The module
trains at 1/100 of the recipe's learning rate, which keeps its identity initialisation under Adam.

Options: ``context`` (basic | large | none, default large), ``width`` (front-end channel multiplier),
``batch_norm`` (default true: batch norm after every front-end conv; false is the paper's front end),
``encoder_weights`` (ImageNet = torchvision's VGG-16, fc6/fc7 reshaped from its classifier).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from segflow.models._vgg import VGG16_STAGES, VGG16Encoder
from segflow.models.base import SegmentationModel, check_choice, check_flag, check_width, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = "Yu & Koltun, Multi-Scale Context Aggregation by Dilated Convolutions, ICLR 2016"
RECIPE = Recipe(
    source="Yu & Koltun 2016 §4-5: SGD with momentum (Caffe) on an ImageNet VGG-16 front end, then the context module",
    optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly",
    from_scratch=SCRATCH_ADAMW,
)

DILATIONS = (1, 1, 2, 4, 8, 16, 1)
LARGE_MULTIPLIERS = (2, 2, 4, 8, 16, 32, 32)
NOISE_STD = 1e-3


class ContextModule(nn.Module):
    def __init__(self, num_classes: int, large: bool) -> None:
        super().__init__()
        c = num_classes
        widths = [c * m for m in LARGE_MULTIPLIERS] if large else [c] * len(DILATIONS)
        layers: list[nn.Module] = []
        c_in = c
        for c_out, d in zip(widths, DILATIONS):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, c, 1))
        self.layers = nn.Sequential(*layers)
        self.num_classes = c
        for conv in self.layers:
            if isinstance(conv, nn.Conv2d):
                identity_init(conv, c, noise=NOISE_STD if large else 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


@torch.no_grad()
def identity_init(conv: nn.Conv2d, num_classes: int, noise: float = 0.0) -> None:
    """Eq. (5) of the paper: the centre tap maps input channel a to output b with weight C / c_out when
    floor(a C / c_in) == floor(b C / c_out); everything else is 0 (basic) or small noise (large).
    With c_in == c_out == C this is the identity."""
    c_out, c_in, kh, kw = conv.weight.shape
    device = conv.weight.device
    a = torch.arange(c_in, device=device)
    b = torch.arange(c_out, device=device)
    same_group = (b[:, None] * num_classes // c_out) == (a[None, :] * num_classes // c_in)
    weight = torch.zeros_like(conv.weight)
    if noise:
        weight.normal_(0.0, noise)
    weight[:, :, kh // 2, kw // 2] += same_group.to(weight.dtype) * (num_classes / c_out)
    conv.weight.copy_(weight)
    conv.bias.zero_()


class DilatedNet(SegmentationModel):
    size_divisor = 8
    # Adam's steps do not scale with a weight's size: at the recipe's rate they swamp the large module's
    # 1/32 identity taps and 1e-3 noise within tens of steps (val mIoU stayed the majority class's at 10 epochs).
    lr_multipliers = {"context.": 0.01}

    def __init__(self, num_classes: int, context: str = "large", width: float = 1.0,
                 batch_norm: bool = True) -> None:
        super().__init__()
        pools: list[nn.Module] = [nn.MaxPool2d(2, 2) for _ in range(3)] + [nn.Identity(), nn.Identity()]
        assert len(pools) == len(VGG16_STAGES)
        self.encoder = VGG16Encoder(width, pools=pools, dilations=(1, 1, 1, 1, 2), fc=(4096, 7, 4),
                                     batch_norm=batch_norm)
        self.final = nn.Conv2d(self.encoder.out_channels, num_classes, 1)
        self.context = None if context == "none" else ContextModule(num_classes, large=context == "large")

    def _forward(self, x: Tensor) -> Tensor:
        scores = self.final(self.encoder(x))
        if self.context is None:
            return scores
        return self.context(scores - scores.amin(dim=1, keepdim=True))


@register("dilatednet", family="dilatednet", paper=PAPER, recipe=RECIPE)
def dilatednet(num_classes: int, *, context: str = "large", width: float = 1.0, batch_norm: bool = True,
               encoder_weights: Any = None) -> nn.Module:
    check_choice("context", context, ("basic", "large", "none"))
    model = DilatedNet(num_classes, context, check_width(width), check_flag("batch_norm", batch_norm))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)
