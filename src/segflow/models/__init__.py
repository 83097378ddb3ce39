"""Model zoo: ``available()``, ``build(name, num_classes, **options)``, ``describe(name)``, ``recipe(name)``.

One module per architecture family registers its names into :mod:`segflow.models.zoo`, imported when one
of its models is first built or described (segflow.models.names maps names to families); every model follows
the conventions of :mod:`segflow.models.base` (any input size, logits N x K x H x W, and ``{"out", "aux"}`` in
training mode for models with an auxiliary head).
"""

import importlib

# The zoo's names are imported on first use, so that `segflow.models.names` (read by the config, without torch)
# does not load torch with the package.
_EXPORTS = {"init_output_bias": "base", "Recipe": "recipes", "ModelInfo": "zoo", "available": "zoo", "build": "zoo",
            "describe": "zoo", "recipe": "zoo", "register": "zoo"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segflow.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"segflow.models.{_EXPORTS[name]}"), name)
