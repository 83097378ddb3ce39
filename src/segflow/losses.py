"""Training losses: per-pixel weighted cross-entropy, the one form the labeled, pseudo-labeled and consistency
terms all take."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX


def class_weight_of_pixels(target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor | float:
    """Each pixel's class weight (by its target; ignored pixels get class 0's, and count for nothing anyway)."""
    if class_weight is None:
        return 1.0
    return class_weight[target.where(target != IGNORE_INDEX, 0)]


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
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    by_class = class_weight_of_pixels(target, class_weight)
    return (per_pixel * pixel_weight * by_class).sum() / (counted.float() * by_class).sum().clamp_min(1e-12)


def pixel_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    pseudo_class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels, each weighted by its image's weight (pseudo-labeled images
    get less trust) and by its class's weight: ``class_weight`` on labeled images, ``pseudo_class_weight`` on
    the images ``pseudo`` marks (both normalised together, as one ``F.cross_entropy(weight=...)`` would)."""
    pixel_weight = weight.view(-1, 1, 1) * (target != IGNORE_INDEX)
    by_class = class_weight_of_pixels(target, class_weight)
    if pseudo is not None and pseudo.any():
        by_class = torch.where(pseudo.view(-1, 1, 1), class_weight_of_pixels(target, pseudo_class_weight), by_class)
    pixel_weight = pixel_weight * by_class
    return weighted_cross_entropy(logits, target, pixel_weight, pixel_weight)


def segmentation_loss(
    output: torch.Tensor | dict[str, torch.Tensor],
    target: torch.Tensor,
    weight: torch.Tensor,
    aux_weight: float,
    class_weight: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    pseudo_class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of any auxiliary head (PSPNet's is 0.4 in the paper)."""
    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return pixel_weighted_cross_entropy(logits, target, weight, class_weight, pseudo, pseudo_class_weight)

    if isinstance(output, torch.Tensor):
        return loss_of(output)
    loss = loss_of(output["out"])
    for name, aux_logits in output.items():
        if name != "out":
            loss = loss + aux_weight * loss_of(aux_logits)
    return loss
