"""Training losses: per-pixel weighted cross-entropy, the one form the labeled, pseudo-labeled and consistency
terms all take."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    pixel_weight: torch.Tensor,
    counted: torch.Tensor,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each pixel times ``pixel_weight``, summed, over the sum of ``counted`` (the pixels the
    loss is an average over). With ``class_weight``, both sides weigh a pixel by its target's class, as
    ``F.cross_entropy(weight=...)`` normalises. Pixels whose target is ``IGNORE_INDEX`` add nothing."""
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="none")
    counted = counted.float()
    if class_weight is not None:
        counted = counted * class_weight[target.where(target != IGNORE_INDEX, 0)]
    return (per_pixel * pixel_weight).sum() / counted.sum().clamp_min(1e-12)


def pixel_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels, each weighted by its image's weight (pseudo-labeled images
    get less trust) and, optionally, by its class's weight."""
    pixel_weight = weight.view(-1, 1, 1) * (target != IGNORE_INDEX)
    return weighted_cross_entropy(logits, target, pixel_weight, pixel_weight, class_weight)


def segmentation_loss(
    output: torch.Tensor | dict[str, torch.Tensor],
    target: torch.Tensor,
    weight: torch.Tensor,
    aux_weight: float,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of any auxiliary head (PSPNet's is 0.4 in the paper)."""
    if isinstance(output, torch.Tensor):
        return pixel_weighted_cross_entropy(output, target, weight, class_weight)
    loss = pixel_weighted_cross_entropy(output["out"], target, weight, class_weight)
    for name, aux_logits in output.items():
        if name != "out":
            loss = loss + aux_weight * pixel_weighted_cross_entropy(aux_logits, target, weight, class_weight)
    return loss
