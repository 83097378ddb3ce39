"""VGG-16 encoder shared by the classic models (Simonyan & Zisserman, ICLR 2015).

The conv layers keep torchvision's ``features`` layout (same indices, with BN when ``batch_norm``), so the
ImageNet state dicts of ``torchvision.models.vgg16`` / ``vgg16_bn`` load as they are; the models only swap the
pooling layers (3x3 pools, stride 1, index-returning pools, or ``nn.Identity`` for a removed pool) and set
the dilation of a stage. ``fc6``/``fc7`` are optional convolutions; ImageNet ``classifier.0``/``classifier.3``
weights are reshaped into them (and decimated when the conv is smaller, as DeepLab v1 does for its fc6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn

from segflow.errors import SegflowError
from segflow.models.base import channels, torchvision_state_dict

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


@dataclass
class Stage:
    out: Tensor
    """Output of the stage's pooling layer."""
    indices: Tensor | None
    """Max-pooling indices, when the pool returns them."""
    size: torch.Size
    """Spatial size before pooling."""


class VGG16Encoder(nn.Module):
    def __init__(
        self,
        width: float = 1.0,
        batch_norm: bool = False,
        pools: Sequence[nn.Module] | None = None,
        dilations: Sequence[int] = (1, 1, 1, 1, 1),
        fc: tuple[int, int, int] | None = None,
        fc_dropout: float = 0.5,
    ) -> None:
        """``fc = (channels, kernel, dilation)`` of fc6 (fc7 is 1x1 with the same channels); ``None``: no fc.

        With ``batch_norm`` every conv, fc6/fc7 included, is followed by batch norm.
        """
        super().__init__()
        pools = pools if pools is not None else [nn.MaxPool2d(2, 2) for _ in VGG16_STAGES]
        self.width = width
        self.batch_norm = batch_norm
        layers: list[nn.Module] = []
        self._pool_positions: set[int] = set()
        self.stage_channels: list[int] = []
        c_in = 3
        for convs, pool, d in zip(VGG16_STAGES, pools, dilations, strict=True):
            for c in convs:
                c_out = channels(c, width)
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU(inplace=True))
                c_in = c_out
            self._pool_positions.add(len(layers))
            layers.append(pool)
            self.stage_channels.append(c_in)
        self.features = nn.Sequential(*layers)
        self.out_channels = c_in
        if fc is not None:
            fc_channels, kernel, dilation = fc
            fc_channels = channels(fc_channels, width)
            self.fc6 = nn.Conv2d(c_in, fc_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation)
            self.bn6 = nn.BatchNorm2d(fc_channels) if batch_norm else nn.Identity()
            self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
            self.bn7 = nn.BatchNorm2d(fc_channels) if batch_norm else nn.Identity()
            self.drop = nn.Dropout(fc_dropout)
            self.out_channels = fc_channels
        else:
            self.fc6 = self.fc7 = None
        for m in self.modules():  # torchvision's VGG init; PyTorch's default lets a plain 15-layer stack vanish
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor) -> list[Stage]:
        """Run the conv layers; one :class:`Stage` per pooling layer."""
        stages = []
        for i, layer in enumerate(self.features):
            if i in self._pool_positions:
                size = x.shape[-2:]
                result = layer(x)
                x, indices = result if isinstance(result, tuple) else (result, None)
                stages.append(Stage(x, indices, size))
            else:
                x = layer(x)
        return stages

    def fc(self, x: Tensor) -> Tensor:
        """fc6 -> (BN) -> ReLU -> dropout -> fc7 -> (BN) -> ReLU -> dropout."""
        x = self.drop(torch.relu(self.bn6(self.fc6(x))))
        return self.drop(torch.relu(self.bn7(self.fc7(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(x)[-1].out
        return self.fc(x) if self.fc6 is not None else x

    def imagenet_state_dict(self) -> Mapping[str, Tensor]:
        if self.width != 1.0:
            raise SegflowError(
                f"option encoder_weights='imagenet' needs width 1.0 (the VGG-16 weights); got width {self.width}."
            )
        weights = torchvision.models.VGG16_BN_Weights if self.batch_norm else torchvision.models.VGG16_Weights
        return torchvision_state_dict(weights.IMAGENET1K_V1)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Turn VGG classifier weights (``classifier.0``/``classifier.3``) into the fc6/fc7 convolutions."""
        if self.fc6 is None:
            return state
        state = dict(state)
        for src, conv, name in (("classifier.0", self.fc6, "fc6"), ("classifier.3", self.fc7, "fc7")):
            weight, bias = state.pop(f"{src}.weight", None), state.pop(f"{src}.bias", None)
            if weight is None or weight.ndim != 2 or bias is None:
                continue
            in_channels = conv.in_channels
            side = int(round((weight.shape[1] / in_channels) ** 0.5))
            if side * side * in_channels != weight.shape[1]:
                continue
            weight = weight.reshape(weight.shape[0], in_channels, side, side)
            state[f"{name}.weight"] = _decimate(weight, conv.weight.shape)
            state[f"{name}.bias"] = _decimate(bias, conv.bias.shape)
        return state


def _decimate(t: Tensor, shape: torch.Size) -> Tensor:
    """Subsample ``t`` along each dimension to ``shape`` (every k-th entry), when it is larger."""
    if t.shape == shape or t.ndim != len(shape) or any(a < b for a, b in zip(t.shape, shape)):
        return t
    steps = tuple(slice(None, None, -(-a // b)) for a, b in zip(t.shape, shape))
    t = t[steps]
    return t[tuple(slice(0, b) for b in shape)].contiguous()
