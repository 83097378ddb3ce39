"""The training loop's parts: optimizer, class balance, runtime, checkpoints, EMA, consistency, losses."""
