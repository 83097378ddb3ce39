"""One name -> builder registry for every segmentation architecture in the zoo.

A family module registers each of its names with :func:`register`::

    @register("fcn8s", family="fcn", paper=PAPER, recipe=RECIPE)
    def fcn8s(num_classes: int, *, width: float = 1.0, encoder_weights: str | None = None) -> nn.Module: ...

The builder's keyword-only parameters *are* the model's options: their defaults are what :func:`describe`
reports, and :func:`build` rejects any option the builder does not declare. ``recipe`` is how the paper (or
the reference implementation) trained it (segflow.models.recipes).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from segflow.errors import SegflowError
from segflow.models.base import check_encoder_weights
from segflow.models.names import ARCHITECTURES, FAMILY_MODULES, unknown_architecture
from segflow.models.recipes import Recipe

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`describe` tells about a registered architecture."""

    name: str
    family: str
    paper: str
    """One-line citation of the paper the architecture follows."""
    recipe: Recipe
    default_options: dict[str, Any] = field(default_factory=dict)
    aux: bool = False
    """True when the model returns ``{"out", "aux"}`` in training mode (with its default options)."""

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.default_options)


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    info: ModelInfo


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, family: str, paper: str, recipe: Recipe, aux: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, **options)`` under ``name``."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise RuntimeError(f"model name {name!r} registered twice")
        defaults = {
            p.name: p.default
            for p in inspect.signature(builder).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        _REGISTRY[name] = _Entry(builder, ModelInfo(name, family, paper, recipe, defaults, aux))
        return builder

    return decorator


def available() -> list[str]:
    """Every model name, sorted (segflow.models.names: known before any family module is imported)."""
    return list(ARCHITECTURES)


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or (problem := unknown_architecture(name)) is not None:
        raise SegflowError(f"{problem or f'unknown architecture {name!r}'}.")
    if name not in _REGISTRY:  # its family registers it when first imported
        importlib.import_module(f"segflow.models.{FAMILY_MODULES[name]}")
    return _REGISTRY[name]


def describe(name: str) -> ModelInfo:
    """Family, paper and default options of a registered model."""
    return _entry(name).info


def recipe(name: str, *overrides: dict[str, Any]) -> Recipe:
    """Model ``name``'s training recipe with ``overrides`` applied in order (params.yaml: ``train``'s fields set
    for every architecture, then ``models.NAME.recipe``)."""
    result = _entry(name).info.recipe
    for fields in overrides:
        result = result.with_overrides(fields)
    return result


def build(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` predicting ``num_classes`` classes; ``options`` override the builder's defaults.

    Every model takes N x 3 x H x W float input of any H, W and returns N x num_classes x H x W logits
    (``{"out": logits, "aux": aux_logits}`` in training mode for models with an auxiliary head).
    """
    entry = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SegflowError(f"num_classes must be a positive integer, got {num_classes!r}.")
    known = entry.info.default_options
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise SegflowError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for model {name!r}; "
            f"its options are: {listed}."
        )
    if "encoder_weights" in options:  # fail before building anything big
        check_encoder_weights(options["encoder_weights"], allow_other_names=entry.info.family == "smp")
    return entry.builder(num_classes, **options)
