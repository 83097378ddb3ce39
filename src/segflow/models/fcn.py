"""Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015.

``fcn32s`` / ``fcn16s`` / ``fcn8s``: VGG-16 with fc6/fc7 as convolutions (7x7 and 1x1, 4096 channels, ReLU and
dropout), 1x1 score layers, transposed-convolution upsampling initialised to bilinear interpolation: the 2x
upsamplings are learned, the final 32x/16x/8x one is fixed (a buffer), as in the paper; FCN-16s fuses
``pool4`` scores, FCN-8s also ``pool3`` scores; the skip score layers start at zero. Differences from the
Caffe model: instead of the 100-pixel input padding and the crop layers, fc6 is padded "same" (3) and the base
pads the input to a multiple of 32 and crops the logits back, so every stride lines up exactly and small
images work; ``score_fr`` keeps PyTorch's default init (a zero init would block the first step's gradient
into a randomly initialised backbone). ``width`` scales every channel count (1.0 = the paper, ~134M params).
``batch_norm`` (default true) puts batch norm after every conv, fc6/fc7 included: the paper fine-tuned an
ImageNet VGG-16 without it; from random init, without it FCN-8s predicted the majority class at every epoch of
the default pipeline (val mIoU 0.149, mean class accuracy 1/K). ``batch_norm: false`` is the paper's network.

``fcn_resnet50``: torchvision's ``fcn_resnet50`` (dilated ResNet-50, output stride 8, FCN head; auxiliary
head on ``layer3`` returned as ``"aux"`` in training mode when ``aux`` is on).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models._vgg import VGG16Encoder
from segflow.models.base import SegmentationModel, check_flag, check_width, init_encoder, torchvision_state_dict
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = "Long, Shelhamer & Darrell, Fully Convolutional Networks for Semantic Segmentation, CVPR 2015"
RECIPE = Recipe(
    source="Long et al. 2015 §4.3: SGD, momentum 0.9, lr 1e-4 fixed, weight decay 5e-4, biases at 2x lr, 20 images "
           "a batch",
    optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly", bias_lr_mult=2.0,
    from_scratch=SCRATCH_ADAMW + "; batch norm in the network (option batch_norm); poly instead of fixed, so "
                 "that the budget ends annealed",
)
TORCHVISION_RECIPE = Recipe(
    source="torchvision references/segmentation: SGD, momentum 0.9, lr 0.02, weight decay 1e-4, poly, aux weight 0.5",
    optimizer="sgd", lr=0.02, weight_decay=1e-4, momentum=0.9, lr_schedule="poly", aux_weight=0.5,
)


def bilinear_kernel(num_channels: int, kernel_size: int, device: torch.device | None = None) -> Tensor:
    """Weights of a ``num_channels -> num_channels`` transposed conv that upsamples each channel bilinearly."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32, device=device)
    filt = 1 - (og - center).abs() / factor
    filt2d = filt[:, None] * filt[None, :]
    eye = torch.eye(num_channels, device=device)
    return eye[:, :, None, None] * filt2d


def upsampler(num_channels: int, factor: int) -> nn.ConvTranspose2d:
    """Learnable ``factor``x upsampling, initialised to bilinear interpolation."""
    up = nn.ConvTranspose2d(num_channels, num_channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(num_channels, 2 * factor, up.weight.device))
    return up


class FixedBilinearUp(nn.Module):
    """``factor``x bilinear upsampling as a fixed transposed convolution (the paper's final layer)."""

    def __init__(self, num_channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("weight", bilinear_kernel(num_channels, 2 * factor), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.factor, padding=self.factor // 2)


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(SegmentationModel):
    size_divisor = 32

    def __init__(self, num_classes: int, stride: int = 8, width: float = 1.0, batch_norm: bool = True) -> None:
        super().__init__()
        if stride not in (32, 16, 8):
            raise ValueError(f"stride must be 32, 16 or 8, got {stride}")
        self.stride = stride
        self.encoder = VGG16Encoder(width, batch_norm=batch_norm, fc=(4096, 7, 1))
        c3, c4 = self.encoder.stage_channels[2], self.encoder.stage_channels[3]
        self.score_fr = nn.Conv2d(self.encoder.out_channels, num_classes, 1)
        if stride <= 16:
            self.score_pool4 = zero_conv(c4, num_classes)
            self.upscore2 = upsampler(num_classes, 2)
        if stride == 8:
            self.score_pool3 = zero_conv(c3, num_classes)
            self.upscore_pool4 = upsampler(num_classes, 2)
        self.upscore = FixedBilinearUp(num_classes, stride)

    def _forward(self, x: Tensor) -> Tensor:
        stages = self.encoder.stages(x)
        score = self.score_fr(self.encoder.fc(stages[4].out))
        if self.stride <= 16:
            score = self.upscore2(score) + self.score_pool4(stages[3].out)
        if self.stride == 8:
            score = self.upscore_pool4(score) + self.score_pool3(stages[2].out)
        return self.upscore(score)


def _fcn(num_classes: int, stride: int, width: Any, batch_norm: Any, encoder_weights: Any) -> nn.Module:
    model = FCN(num_classes, stride, check_width(width), check_flag("batch_norm", batch_norm))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)


@register("fcn32s", family="fcn", paper=PAPER, recipe=RECIPE)
def fcn32s(num_classes: int, *, width: float = 1.0, batch_norm: bool = True,
          encoder_weights: Any = None) -> nn.Module:
    return _fcn(num_classes, 32, width, batch_norm, encoder_weights)


@register("fcn16s", family="fcn", paper=PAPER, recipe=RECIPE)
def fcn16s(num_classes: int, *, width: float = 1.0, batch_norm: bool = True,
          encoder_weights: Any = None) -> nn.Module:
    return _fcn(num_classes, 16, width, batch_norm, encoder_weights)


@register("fcn8s", family="fcn", paper=PAPER, recipe=RECIPE)
def fcn8s(num_classes: int, *, width: float = 1.0, batch_norm: bool = True,
          encoder_weights: Any = None) -> nn.Module:
    return _fcn(num_classes, 8, width, batch_norm, encoder_weights)


class TorchvisionFCN(SegmentationModel):
    """torchvision's ``fcn_resnet50``; the auxiliary head only runs in training mode."""

    size_divisor = 8

    def __init__(self, num_classes: int, aux: bool) -> None:
        super().__init__()
        net = torchvision.models.segmentation.fcn_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux
        )
        self.encoder = net.backbone
        self.classifier = net.classifier
        self.aux_classifier = net.aux_classifier

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        features = self.encoder(x)
        out = self.classifier(features["out"])
        aux = None
        if self.training and self.aux_classifier is not None:
            aux = self.aux_classifier(features["aux"])
        return out, aux


def _resnet50_imagenet() -> dict[str, Tensor]:
    return torchvision_state_dict(torchvision.models.ResNet50_Weights.IMAGENET1K_V1)


@register("fcn_resnet50", family="fcn", paper=PAPER, recipe=TORCHVISION_RECIPE, aux=True)
def fcn_resnet50(num_classes: int, *, aux: bool = True, encoder_weights: Any = None) -> nn.Module:
    if not isinstance(aux, bool):
        raise SegflowError(f"option aux must be true or false; got {aux!r}.")
    return init_encoder(TorchvisionFCN(num_classes, aux), encoder_weights, _resnet50_imagenet)
