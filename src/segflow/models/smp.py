"""Iakubovskii, "Segmentation Models Pytorch", GitHub 2019 - encoder/decoder models, each after its own paper.

Every name wraps the segmentation-models-pytorch class of the same architecture in the zoo's base (pad to a
multiple of 32 / crop back, no auxiliary output). Options shared by all of them:

* ``encoder_name`` - any SMP encoder (``resnet18``, ``efficientnet-b0``, ``mit_b0`` ...) or a timm encoder as
  ``tu-<timm name>``. Default ``resnet18`` (fast enough for CPU training; SegFormer defaults to its own
  Mix Transformer ``mit_b0``).
* ``encoder_weights`` - ``None`` | ``"imagenet"`` (or another SMP weight name) | a local weights file.

DeepLab v3 / v3+ also take ``output_stride`` (8 or 16) and ``atrous_rates`` (default: the papers' rates for
that stride, 6/12/18 at 16 and 12/24/36 at 8). SMP's DeepLab v3 matches the paper's head - ASPP with a 1x1
branch, three 3x3 atrous branches and image-level pooling, 256 channels with batch norm - except that it
adds one 3x3 conv after the ASPP projection (as torchvision does too) and has no multi-grid in block 4.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models.base import (
    SegmentationModel,
    check_choice,
    check_encoder_weights,
    hub_guard,
    init_encoder,
    pretrained_unavailable,
)
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

DEFAULT_ENCODER = "resnet18"

PAPERS = {
    "unet": "Ronneberger et al., U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015",
    "unetplusplus": "Zhou et al., UNet++: A Nested U-Net Architecture for Medical Image Segmentation, DLMIA 2018",
    "deeplabv3": "Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation, arXiv:1706.05587, 2017",
    "deeplabv3plus": "Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic Image "
    "Segmentation, ECCV 2018",
    "fpn": "Kirillov et al., Panoptic Feature Pyramid Networks, CVPR 2019",
    "pan": "Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018",
    "linknet": "Chaurasia & Culurciello, LinkNet: Exploiting Encoder Representations for Efficient Semantic "
    "Segmentation, VCIP 2017",
    "manet": "Fan et al., MA-Net: A Multi-Scale Attention Network for Liver and Tumor Segmentation, IEEE Access 2020",
    "upernet": "Xiao et al., Unified Perceptual Parsing for Scene Understanding, ECCV 2018",
    "segformer": "Xie et al., SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers, "
    "NeurIPS 2021",
}

MMSEG_SCHEDULE = "MMSegmentation's CNN schedule: SGD, momentum 0.9, lr 0.01, weight decay 5e-4, poly (power 0.9)"
# Each architecture's training as its paper (or, where the paper gives none, MMSegmentation) states it; SMP
# itself prescribes none. From random init segflow trains them with AdamW (recipe.SCRATCH_ADAMW).
RECIPES = {name: Recipe(source=source, optimizer="adamw", lr=2e-3, weight_decay=1e-4, lr_schedule="poly",
                        new_layers_lr_mult=mult, from_scratch=SCRATCH_ADAMW)
           for name, source, mult in [
    ("unet", f"{MMSEG_SCHEDULE} (the paper: Caffe SGD, momentum 0.99, one tile a batch)", 1.0),
    ("unetplusplus", "Zhou et al. 2018 §4: Adam, lr 3e-4", 1.0),
    ("deeplabv3", "Chen et al. 2017 §4.1: SGD, momentum 0.9, lr 0.007, poly (power 0.9), 16 images a batch", 1.0),
    ("deeplabv3plus", "Chen et al. 2018 §4, DeepLab v3's protocol: SGD, momentum 0.9, lr 0.007, poly (power 0.9), "
                      "16 images a batch", 1.0),
    ("fpn", f"{MMSEG_SCHEDULE} (Semantic FPN)", 1.0),
    ("pan", MMSEG_SCHEDULE, 1.0),
    ("linknet", "Chaurasia & Culurciello 2017 §4: RMSProp, lr 5e-4", 1.0),
    ("manet", MMSEG_SCHEDULE, 1.0),
    ("upernet", f"{MMSEG_SCHEDULE} (UPerNet)", 1.0),
]}
RECIPES["segformer"] = Recipe(
    source="Xie et al. 2021 §4.1 and MMSegmentation: AdamW, lr 6e-5, weight decay 0.01, poly (power 1), warm-up "
           "1500 iterations, head at 10x, no weight decay on norms",
    optimizer="adamw", lr=1e-3, weight_decay=0.01, lr_schedule="poly", warmup_steps=50, new_layers_lr_mult=10.0,
    norm_bias_decay=False,
    from_scratch="lr 6e-5 fine-tunes an ImageNet MiT; from random init at 1e-3 (as the other architectures here), "
                 "with a 50-step warm-up instead of 1500 (a few epochs here are a few hundred steps)",
)

_PAPER_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class SMPModel(SegmentationModel):
    """A segmentation-models-pytorch network under the zoo's conventions."""

    size_divisor = 32

    def __init__(self, net: nn.Module, size_divisor: int = 32) -> None:
        super().__init__()
        self.net = net
        self.size_divisor = size_divisor

    def encoder_module(self) -> nn.Module:
        return self.net.encoder

    def _forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _check_encoder(encoder_name: Any) -> None:
    if not isinstance(encoder_name, str) or not encoder_name:
        raise SegflowError(f"option encoder_name must be an encoder name such as 'resnet18'; got {encoder_name!r}.")
    if encoder_name.startswith("tu-"):
        import timm

        if not timm.is_model(encoder_name[3:]):
            raise SegflowError(f"option encoder_name: {encoder_name!r} is not a timm model (see timm.list_models()).")
    elif encoder_name not in smp.encoders.get_encoder_names():
        raise SegflowError(
            f"option encoder_name: unknown encoder {encoder_name!r}; use an SMP encoder "
            f"(e.g. resnet18, resnet50, efficientnet-b0, mit_b0) or 'tu-<timm model>'."
        )


def _build(cls: type[nn.Module], name: str, num_classes: int, encoder_name: str, encoder_weights: Any,
           size_divisor: int = 32, **kwargs: Any) -> SMPModel:
    _check_encoder(encoder_name)
    kind = check_encoder_weights(encoder_weights, allow_other_names=True)
    net = None
    if kind == "named":
        weights = True if encoder_name.startswith("tu-") else str(encoder_weights).strip()
        try:
            with hub_guard(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = cls(encoder_name=encoder_name, encoder_weights=weights, classes=num_classes, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a download error becomes one paragraph
            raise pretrained_unavailable(f"the weights of encoder {encoder_name}",
                                         f"cannot be had here ({type(exc).__name__}: {exc})") from None
    if net is None:
        try:
            net = cls(encoder_name=encoder_name, encoder_weights=None, classes=num_classes, **kwargs)
        except (KeyError, ValueError, RuntimeError, TypeError, AssertionError) as exc:
            raise SegflowError(f"model {name!r} cannot be built with encoder_name={encoder_name!r}: {exc}") from None
    model = SMPModel(net, size_divisor)
    if kind == "file":
        init_encoder(model, encoder_weights)
    return model


def _rates(output_stride: Any, atrous_rates: Sequence[int] | None) -> tuple[int, ...]:
    check_choice("output_stride", output_stride, (8, 16))
    if atrous_rates is None:
        return _PAPER_RATES[output_stride]
    if (isinstance(atrous_rates, (str, bytes)) or len(atrous_rates) != 3
            or not all(isinstance(r, int) and r > 0 for r in atrous_rates)):
        raise SegflowError(f"option atrous_rates must be three positive integers; got {atrous_rates!r}.")
    return tuple(atrous_rates)


@register("unet", family="smp", paper=PAPERS["unet"], recipe=RECIPES["unet"])
def unet(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.Unet, "unet", num_classes, encoder_name, encoder_weights)


@register("unetplusplus", family="smp", paper=PAPERS["unetplusplus"], recipe=RECIPES["unetplusplus"])
def unetplusplus(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER,
                 encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.UnetPlusPlus, "unetplusplus", num_classes, encoder_name, encoder_weights)


@register("deeplabv3", family="smp", paper=PAPERS["deeplabv3"], recipe=RECIPES["deeplabv3"])
def deeplabv3(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None,
              output_stride: int = 16, atrous_rates: Sequence[int] | None = None) -> nn.Module:
    rates = _rates(output_stride, atrous_rates)
    return _build(smp.DeepLabV3, "deeplabv3", num_classes, encoder_name, encoder_weights,
                  encoder_output_stride=output_stride, decoder_atrous_rates=rates)


@register("deeplabv3plus", family="smp", paper=PAPERS["deeplabv3plus"], recipe=RECIPES["deeplabv3plus"])
def deeplabv3plus(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None,
                  output_stride: int = 16, atrous_rates: Sequence[int] | None = None) -> nn.Module:
    rates = _rates(output_stride, atrous_rates)
    return _build(smp.DeepLabV3Plus, "deeplabv3plus", num_classes, encoder_name, encoder_weights,
                  encoder_output_stride=output_stride, decoder_atrous_rates=rates)


@register("fpn", family="smp", paper=PAPERS["fpn"], recipe=RECIPES["fpn"])
def fpn(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.FPN, "fpn", num_classes, encoder_name, encoder_weights)


@register("pan", family="smp", paper=PAPERS["pan"], recipe=RECIPES["pan"])
def pan(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None) -> nn.Module:
    # The feature pyramid attention pools the stride-16 features three more times: pad to 16 * 8.
    return _build(smp.PAN, "pan", num_classes, encoder_name, encoder_weights, size_divisor=128)


@register("linknet", family="smp", paper=PAPERS["linknet"], recipe=RECIPES["linknet"])
def linknet(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER,
            encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.Linknet, "linknet", num_classes, encoder_name, encoder_weights)


@register("manet", family="smp", paper=PAPERS["manet"], recipe=RECIPES["manet"])
def manet(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER, encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.MAnet, "manet", num_classes, encoder_name, encoder_weights)


@register("upernet", family="smp", paper=PAPERS["upernet"], recipe=RECIPES["upernet"])
def upernet(num_classes: int, *, encoder_name: str = DEFAULT_ENCODER,
            encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.UPerNet, "upernet", num_classes, encoder_name, encoder_weights)


@register("segformer", family="smp", paper=PAPERS["segformer"], recipe=RECIPES["segformer"])
def segformer(num_classes: int, *, encoder_name: str = "mit_b0", encoder_weights: str | None = None) -> nn.Module:
    return _build(smp.Segformer, "segformer", num_classes, encoder_name, encoder_weights)
