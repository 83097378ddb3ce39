"""Training losses: per-pixel weighted cross-entropy, the one form the labeled, pseudo-labeled and consistency
terms all take, with OHEM and label smoothing; plus the Dice, Focal and Lovasz losses of
segmentation_models_pytorch, in the weighted sum ``train.loss`` describes."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX
from segflow.config import LossParams

DEFAULT_LOSS = LossParams()


@dataclass(frozen=True)
class LossWeighting:
    """How the training loss weighs its parts: the auxiliary head, pseudo-labeled images, the classes on labeled
    pixels and on pseudo-labeled and unlabeled ones, and the loss's own terms (``train.loss``)."""

    aux_weight: float = 0.0
    pseudo_weight: float = 1.0
    class_weight: torch.Tensor | None = None
    unlabeled_class_weight: torch.Tensor | None = None
    loss: LossParams = field(default_factory=LossParams)


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
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of each pixel times ``pixel_weight``, summed, over the sum of ``counted`` (the pixels the
    loss is an average over). With ``class_weight``, both sides weigh a pixel by its target's class, as
    ``F.cross_entropy(weight=...)`` normalises. Pixels whose target is ``IGNORE_INDEX`` add nothing."""
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none",
                                label_smoothing=label_smoothing)
    by_class = class_weight_of_pixels(target, class_weight)
    return (per_pixel * pixel_weight * by_class).sum() / (counted.float() * by_class).sum().clamp_min(1e-12)


def ohem_pixels(logits: torch.Tensor, target: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """The hard pixels (MMSegmentation's OHEMPixelSampler): those whose predicted probability of their true class
    is below ``threshold``, or below the probability of the ``min_kept`` x images-th hardest if that is higher, so
    that at least that many pixels count. Ignored pixels are never kept."""
    with torch.no_grad():
        valid = target != IGNORE_INDEX
        true_class = target.where(valid, 0).unsqueeze(1)
        probability = logits.float().softmax(dim=1).gather(1, true_class).squeeze(1)
        ranked = probability[valid].sort().values
        if ranked.numel() == 0:
            return valid
        at_least = ranked[min(min_kept * target.shape[0], ranked.numel() - 1)]
        return valid & (probability < torch.maximum(at_least, torch.tensor(threshold, device=logits.device)))


def pixel_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    class_weight: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    pseudo_class_weight: torch.Tensor | None = None,
    loss: LossParams = DEFAULT_LOSS,
) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels (the hard ones with ``loss.ohem_threshold``), each weighted
    by its image's weight (pseudo-labeled images get less trust) and by its class's weight: ``class_weight`` on
    labeled images, ``pseudo_class_weight`` on the images ``pseudo`` marks (both normalised together, as one
    ``F.cross_entropy(weight=...)`` would)."""
    counted = target != IGNORE_INDEX
    if loss.ohem_threshold is not None:
        counted = ohem_pixels(logits, target, loss.ohem_threshold, loss.ohem_min_kept)
    pixel_weight = weight.view(-1, 1, 1) * counted
    by_class = class_weight_of_pixels(target, class_weight)
    if pseudo is not None and pseudo.any():
        by_class = torch.where(pseudo.view(-1, 1, 1), class_weight_of_pixels(target, pseudo_class_weight), by_class)
    pixel_weight = pixel_weight * by_class
    return weighted_cross_entropy(logits, target, pixel_weight, pixel_weight, label_smoothing=loss.label_smoothing)


@functools.cache
def _smp_losses(focal_gamma: float) -> dict[str, torch.nn.Module]:
    # segmentation_models_pytorch takes seconds to import: only when a Dice, Focal or Lovasz term is on.
    from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss

    return {"dice": DiceLoss("multiclass", ignore_index=IGNORE_INDEX),
            "focal": FocalLoss("multiclass", gamma=focal_gamma, ignore_index=IGNORE_INDEX),
            "lovasz": LovaszLoss("multiclass", ignore_index=IGNORE_INDEX)}


def region_losses(logits: torch.Tensor, target: torch.Tensor, loss: LossParams) -> torch.Tensor | float:
    """``loss``'s weighted Dice, Focal and Lovasz terms (segmentation_models_pytorch.losses) of ``logits``."""
    weights = {"dice": loss.dice, "focal": loss.focal, "lovasz": loss.lovasz}
    if target.shape[0] == 0:  # a batch of pseudo-labeled images only
        return 0.0
    terms = _smp_losses(loss.focal_gamma)
    return sum(w * terms[name](logits.float(), target) for name, w in weights.items() if w)


def segmentation_loss(
    output: torch.Tensor | dict[str, torch.Tensor],
    target: torch.Tensor,
    weight: torch.Tensor,
    aux_weight: float,
    class_weight: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
    pseudo_class_weight: torch.Tensor | None = None,
    loss: LossParams = DEFAULT_LOSS,
) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the loss of any auxiliary head (PSPNet's is 0.4 in the paper). Each is
    ``loss``'s weighted sum: cross-entropy over every image, the region terms over the labeled ones (a
    pseudo-labeled image weighs ``pseudo_weight`` in cross-entropy alone)."""
    labeled = slice(None) if pseudo is None else ~pseudo
    regions = bool(loss.dice or loss.focal or loss.lovasz)  # else no copy of the labeled images' logits per step

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        total = region_losses(logits[labeled], target[labeled], loss) if regions else 0.0
        if loss.cross_entropy:
            total = total + loss.cross_entropy * pixel_weighted_cross_entropy(
                logits, target, weight, class_weight, pseudo, pseudo_class_weight, loss)
        return total

    if isinstance(output, torch.Tensor):
        return loss_of(output)
    summed = loss_of(output["out"])
    for name, aux_logits in output.items():
        if name != "out":
            summed = summed + aux_weight * loss_of(aux_logits)
    return summed
