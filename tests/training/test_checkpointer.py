"""When the training checkpoints: after validated epochs and every n optimizer steps."""


import torch

from segflow.training.checkpoint import Checkpointer, Progress
from segflow.training.distributed import ProcessGroup
from segflow.training.plan import EpochPlan


def test_checkpoints_fall_every_n_optimizer_steps_inside_epochs_and_after_validated_ones(tmp_path):
    # 3 epochs of 5 batches (3 in the last), 2 batches a step: steps end after batches 2, 4, 5 (2, 3 in the last).
    plan = EpochPlan(epochs=3, batches_per_epoch=5, last_epoch_batches=3, accumulate=2, val_interval=2)
    group = ProcessGroup(0, 1, torch.device("cpu"))
    after_steps = [(1, 2), (1, 4), (1, 5), (2, 2), (2, 4), (2, 5), (3, 2), (3, 3)]  # (epoch, batches done)
    every_2 = Checkpointer(tmp_path, group, {}, plan, every_steps=2)
    # Steps 2 and 4; 6 and 8 end an epoch, checkpointed (or not) with it.
    assert [at for at in after_steps if every_2.due(Progress(*at))] == [(1, 4), (2, 2)]
    assert not any(Checkpointer(tmp_path, group, {}, plan, every_steps=None).due(Progress(*at)) for at in after_steps)
    # An epoch ends at (next epoch, 0 batches done): checkpointed after the validated ones, 2 and the last.
    assert [epoch - 1 for epoch in (2, 3, 4) if every_2.due(Progress(epoch, 0))] == [2, 3]
