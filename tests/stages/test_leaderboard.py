"""The leaderboard's words on how each candidate's training ended and on near-copies in test."""

import json

from segflow.stages.leaderboard import near_copy_lines, training_end_lines


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


def test_it_says_how_many_test_images_have_a_near_copy_in_training(tmp_path):
    split_file = tmp_path / "split.json"
    assert near_copy_lines(split_file) == []  # no split stage output: nothing said
    split_file.write_text(json.dumps({"test_images_with_a_near_copy_in_training": 0, "test_images": 20}))
    assert near_copy_lines(split_file) == ["Test images with a near-copy among the training images: 0 of 20."]
    split_file.write_text(json.dumps({"test_images_with_a_near_copy_in_training": 3, "test_images": 20}))
    (line,) = near_copy_lines(split_file)
    assert line.startswith("Test images with a near-copy among the training images: 3 of 20 (validate.allow_shared")
