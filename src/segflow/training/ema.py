"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): an exponential moving average of a model's weights.

torch's :class:`~torch.optim.swa_utils.AveragedModel` keeps the copy; the average is Mean Teacher's, whose decay
starts at 0 and rises to ``decay`` (``min(decay, 1 - 1 / (n + 1))`` after ``n`` updates), so that the first
averages follow the fast-changing weights of a model trained from scratch instead of its random start.
Batch-norm running statistics are averaged with the weights (``use_buffers``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def mean_teacher(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` that :meth:`~AveragedModel.update_parameters` (after each optimizer step) moves
    towards the model's current weights; the averaged network is its ``.module``."""

    def average(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        step_decay = min(decay, 1.0 - 1.0 / (int(updates) + 1))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - step_decay)
        else:  # batch norm's num_batches_tracked: the model's count
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)
