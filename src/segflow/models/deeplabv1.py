"""Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015.

``deeplabv1_largefov``: DeepLab-LargeFOV. VGG-16 whose 3x3 max pools have stride 2 for pool1-3 and stride 1
for pool4/pool5, conv5 with dilation 2, fc6 a 3x3 conv with dilation 12 and 1024 channels, fc7 a 1x1 conv
(1024), both with ReLU and dropout 0.5, fc8 a 1x1 classifier; the output-stride-8 logits are upsampled
bilinearly. ~20.5M parameters, as in the paper. The fully connected CRF post-processing is not part of the
network and is not included. With ``encoder_weights="imagenet"`` fc6/fc7 are subsampled from VGG-16's
fc6/fc7, as the paper does.

Options: ``width`` (channel multiplier, 1.0 = paper), ``batch_norm`` (default true: batch norm after every conv,
fc6/fc7 included; false is the paper's network, which fine-tuned an ImageNet VGG-16 and does not train well from
random init at a CPU budget), ``encoder_weights``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from segflow.models._vgg import VGG16Encoder
from segflow.models.base import SegmentationModel, check_flag, check_width, init_encoder
from segflow.models.recipes import SCRATCH_ADAMW, Recipe
from segflow.models.zoo import register

PAPER = (
    "Chen et al., Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected CRFs, ICLR 2015"
)
RECIPE = Recipe(
    source="Chen et al. 2015 §4.1: SGD, momentum 0.9, lr 1e-3 and 1e-2 on the classifier, x0.1 every 2000 "
           "iterations, weight decay 5e-4, 20 images a batch",
    optimizer="adamw", lr=1e-3, weight_decay=1e-4, lr_schedule="poly", new_layers_lr_mult=10.0,
    from_scratch=SCRATCH_ADAMW + "; at 1e-3 for DeepLab v1, whose val mIoU was 0.421 at 1e-3 against 0.348 at "
                 "2e-3 (width 0.5); batch norm in the network (option batch_norm); poly instead of steps",
)


class DeepLabV1(SegmentationModel):
    size_divisor = 8

    def __init__(self, num_classes: int, width: float = 1.0, batch_norm: bool = True) -> None:
        super().__init__()
        pools = [nn.MaxPool2d(3, 2, padding=1) for _ in range(3)] + [nn.MaxPool2d(3, 1, padding=1) for _ in range(2)]
        self.encoder = VGG16Encoder(width, pools=pools, dilations=(1, 1, 1, 1, 2), fc=(1024, 3, 12),
                                     batch_norm=batch_norm)
        self.fc8 = nn.Conv2d(self.encoder.out_channels, num_classes, 1)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def _forward(self, x: Tensor) -> Tensor:
        return self.fc8(self.encoder(x))


@register("deeplabv1_largefov", family="deeplabv1", paper=PAPER, recipe=RECIPE)
def deeplabv1_largefov(num_classes: int, *, width: float = 1.0, batch_norm: bool = True,
                       encoder_weights: Any = None) -> nn.Module:
    model = DeepLabV1(num_classes, check_width(width), check_flag("batch_norm", batch_norm))
    return init_encoder(model, encoder_weights, model.encoder.imagenet_state_dict)
