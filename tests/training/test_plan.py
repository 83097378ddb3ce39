"""The epochs of one training: early stopping's decision and how a training ended."""

from segflow.training.plan import EpochPlan, Progress, patience_ran_out, training_end

PLAN = EpochPlan(epochs=10, batches_per_epoch=4, last_epoch_batches=4, accumulate=1, val_interval=2)


def _progress(mious: dict[int, float], epochs: int) -> Progress:
    """Trained ``epochs``, validated at the epochs of ``mious``."""
    history = [{"epoch": e, "train_loss": 1.0, **({"val_miou": mious[e]} if e in mious else {})}
               for e in range(1, epochs + 1)]
    best = max(mious, key=lambda e: (mious[e], -e))
    return Progress(epoch=epochs + 1, best_miou=mious[best], best_epoch=best, history=history)


def test_patience_counts_validations_after_the_best_not_epochs():
    progress = _progress({2: 0.5, 4: 0.4, 6: 0.45}, epochs=6)  # best at 2; two validations since
    assert patience_ran_out(2, progress) and not patience_ran_out(3, progress)
    assert not patience_ran_out(None, progress)
    assert not patience_ran_out(1, _progress({2: 0.3, 4: 0.5}, epochs=5))  # epoch 5 was not validated


def test_the_end_says_why_training_stopped_and_whether_it_was_still_improving():
    assert training_end(_progress({2: 0.5, 4: 0.4, 6: 0.45}, epochs=6), PLAN, 2) == {
        "epoch": 6, "max_epochs": 10, "reason": "patience", "patience": 2, "still_improving": False}
    assert training_end(_progress({2: 0.3, 10: 0.5}, epochs=10), PLAN, None)["still_improving"]
    assert training_end(_progress({2: 0.5, 10: 0.3}, epochs=10), PLAN, None) == {
        "epoch": 10, "max_epochs": 10, "reason": "epochs", "patience": None, "still_improving": False}
