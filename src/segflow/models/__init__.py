"""Model zoo: ``available()``, ``build(name, num_classes, **options)``, ``describe(name)``.

One module per architecture family registers its names into :mod:`segflow.models.registry`; every model
follows the conventions of :mod:`segflow.models.base` (any input size, logits N x K x H x W, and
``{"out", "aux"}`` in training mode for models with an auxiliary head).
"""

from segflow.models.registry import ModelInfo, available, build, describe, register

# Importing a family module registers its names.
from segflow.models import (  # noqa: E402,F401  isort: skip
    deconvnet, deeplabv1, deeplabv2, dilatednet, fcdensenet, fcn, pspnet, segnet, smp, unet_original,
)

__all__ = ["ModelInfo", "available", "build", "describe", "register"]
