"""Model zoo: ``available()``, ``build(name, num_classes, **options)``, ``describe(name)``, ``recipe(name)``.

One module per architecture family registers its names into :mod:`segflow.models.registry`, imported when one
of its models is first built or described (segflow.architectures maps names to families); every model follows
the conventions of :mod:`segflow.models.base` (any input size, logits N x K x H x W, and ``{"out", "aux"}`` in
training mode for models with an auxiliary head).
"""

from segflow.models.base import init_output_bias
from segflow.models.recipe import Recipe
from segflow.models.registry import ModelInfo, available, build, describe, recipe, register

__all__ = ["ModelInfo", "Recipe", "available", "build", "describe", "init_output_bias", "recipe", "register"]
