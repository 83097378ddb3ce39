"""The training loop and its parts: plan, loaders, step, optimizer, class balance, runtime, checkpoints, EMA,
consistency, targets, losses, distributed, and the semi-supervised decision."""
