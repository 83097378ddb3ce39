"""The leaderboard's words on how each candidate's training ended."""

from segflow.stages.leaderboard import training_end_lines


def _end(epoch: int, reason: str, still_improving: bool) -> dict:
    return {"training_end": {"epoch": epoch, "max_epochs": 30, "reason": reason, "patience": 5,
                             "still_improving": still_improving}}


def test_it_names_the_models_stopped_early_and_those_still_improving():
    lines = training_end_lines({"unet": _end(12, "patience", False), "pspnet": _end(30, "epochs", True),
                                "fcn8s": _end(30, "epochs", False), "teacher": {}})
    assert lines == ["Stopped early (no better val mIoU in train.patience validations): unet at epoch 12 of 30.",
                     "Still improving at their last validation: pspnet; raise train.epochs (teacher.epochs for the "
                     "teacher) to train them longer."]
    assert training_end_lines({"fcn8s": _end(30, "epochs", False)}) == []
