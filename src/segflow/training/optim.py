"""The recipe's optimizer (parameter groups), learning-rate schedule and mixed-precision type."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from segflow.models.recipes import Recipe


def build_optimizer(recipe: Recipe, model: nn.Module, device: torch.device, *,
                    encoder_loaded: bool) -> torch.optim.Optimizer:
    """The recipe's optimizer over parameter groups: a learning-rate factor (new layers over a loaded encoder,
    biases, the model's own ``lr_multipliers``) and weight decay or none (norm weights and biases, when the recipe
    says so)."""
    encoder = model.encoder_module() if encoder_loaded and hasattr(model, "encoder_module") else None
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr_mult = recipe.bias_lr_mult if name.endswith(".bias") else 1.0
        lr_mult *= next((factor for prefix, factor in getattr(model, "lr_multipliers", {}).items()
                         if name.startswith(prefix)), 1.0)
        if encoder is not None and id(parameter) not in encoder_ids:
            lr_mult *= recipe.new_layers_lr_mult
        norm_or_bias = parameter.ndim <= 1  # batch/group/layer norm weights and every bias are vectors
        decay = 0.0 if norm_or_bias and not recipe.norm_bias_decay else recipe.weight_decay
        groups.setdefault((lr_mult, decay), []).append(parameter)
    param_groups = [{"params": params, "lr": recipe.lr * lr_mult, "weight_decay": decay}
                    for (lr_mult, decay), params in groups.items()]
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum, **fused)
    return torch.optim.AdamW(param_groups, lr=recipe.lr, **fused)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Poly (DeepLab: ``(1 - step / total) ** 0.9``) or constant, after a linear warm-up from a tenth of the
    learning rate when the recipe has one; stepped once per optimizer step, every group scaled alike."""
    warmup = recipe.warmup_steps

    def factor(step: int) -> float:
        decay = (1 - step / total_steps) ** 0.9 if recipe.lr_schedule == "poly" else 1.0
        return decay * (0.1 + 0.9 * step / warmup if step < warmup else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class Optimization:
    """What takes an optimizer step: the optimizer, its schedule, the gradient scaler and the autocast type."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None = None


def build_optimization(recipe: Recipe, model: nn.Module, device: torch.device, *, total_steps: int, amp: bool,
                       encoder_loaded: bool) -> Optimization:
    """The recipe's optimizer and schedule over ``total_steps``; with ``amp`` on CUDA mixed precision (a
    GradScaler for fp16 only)."""
    optimizer = build_optimizer(recipe, model, device, encoder_loaded=encoder_loaded)
    dtype = amp_dtype(device, amp)
    return Optimization(optimizer, build_scheduler(recipe, optimizer, total_steps),
                        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), dtype)
