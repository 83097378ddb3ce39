"""How an architecture is trained: each family registers the recipe of its paper (or reference implementation).

A recipe is the optimizer, its settings, the learning-rate schedule, the parameter groups and the auxiliary
loss weight. ``source`` cites where it comes from in one line; ``from_scratch`` says what segflow changes
because its default is random initialisation at a CPU budget, and why. params.yaml overrides any field for
every architecture (``train.optimizer`` ... set to a value) or for one (``models.ARCH.recipe``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal


@dataclass(frozen=True)
class Recipe:
    source: str
    """One line: the paper (section) or reference implementation the settings follow."""
    optimizer: Literal["sgd", "adamw"]
    lr: float
    weight_decay: float
    momentum: float = 0.9          # sgd only
    lr_schedule: Literal["poly", "constant"] = "poly"
    warmup_steps: int = 0          # linear warm-up from lr / 10 over this many optimizer steps
    new_layers_lr_mult: float = 1.0
    """Learning-rate multiplier of the layers that are not the encoder, when the encoder starts from loaded
    weights (DeepLab, PSPNet: 10, the new classifier learns faster than the pretrained backbone); from random
    init every layer is new and this is 1."""
    bias_lr_mult: float = 1.0      # Caffe-era models: biases at 2x the learning rate
    norm_bias_decay: bool = True   # False: no weight decay on normalisation weights and biases
    aux_weight: float = 0.4        # auxiliary heads' loss weight (PSPNet: 0.4)
    from_scratch: str = ""
    """What differs from ``source`` and why (segflow trains from random init by default)."""

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """This recipe with the fields in ``overrides`` (params.yaml's) replacing its own; None leaves one."""
        changed = {key: value for key, value in overrides.items() if value is not None}
        if not changed:
            return self
        return replace(self, **changed, source=f"{self.source}; overridden in params.yaml: "
                       + ", ".join(f"{key}={value!r}" for key, value in changed.items()))

    def settings(self) -> dict[str, Any]:
        """The trainable settings (no citation), e.g. for MLflow's parameters."""
        values = asdict(self)
        return {key: values[key] for key in FIELDS}

    def describe(self, aux: bool = True) -> str:
        """The settings, where they come from and what segflow changed."""
        return f"{self.summary(aux)}. Source: {self.source}." + (f" From scratch: {self.from_scratch}" if self.from_scratch else "")

    def summary(self, aux: bool = True) -> str:
        """One line of the settings; ``aux``: the model has an auxiliary head (else its weight is not shown)."""
        parts = [f"{self.optimizer} lr {self.lr:g}"]
        if self.optimizer == "sgd":
            parts.append(f"momentum {self.momentum:g}")
        parts += [f"weight decay {self.weight_decay:g}", f"{self.lr_schedule} schedule"]
        if self.warmup_steps:
            parts.append(f"warm-up {self.warmup_steps} steps")
        if self.new_layers_lr_mult != 1:
            parts.append(f"new layers {self.new_layers_lr_mult:g}x lr over a loaded encoder")
        if self.bias_lr_mult != 1:
            parts.append(f"biases {self.bias_lr_mult:g}x lr")
        if not self.norm_bias_decay:
            parts.append("no weight decay on norm and bias")
        if aux:
            parts.append(f"aux weight {self.aux_weight:g}")
        return ", ".join(parts)


# The change most recipes need (their papers fine-tuned ImageNet backbones), measured once and cited by each.
SCRATCH_ADAMW = (
    "the paper fine-tuned an ImageNet backbone with SGD at a small learning rate; from random init (segflow's "
    "default) in a few epochs AdamW at 2e-3 with poly decay trains further (CamVid 90x120, 10 epochs, seed 0, val "
    "mIoU: DeepLab v3+ AdamW 1e-3 / 2e-3 / 4e-3 0.419 / 0.431 / 0.425, SGD 1e-2 0.308; DeepLab v1 with batch norm "
    "AdamW 1e-3 0.421, SGD 1e-2 / 5e-2 0.394 / 0.370)"
)

FIELDS = tuple(f.name for f in fields(Recipe) if f.name not in ("source", "from_scratch"))
"""The fields params.yaml can set (``train.FIELD`` for every architecture, ``models.ARCH.recipe.FIELD``)."""


def split_model_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """params.yaml's ``models.ARCH``: the builder's options (what the model card records) and the overrides of
    its training recipe (the ``recipe`` key)."""
    return {k: v for k, v in options.items() if k != "recipe"}, dict(options.get("recipe", {}))
