"""Pictures: palette masks that stay index masks, legends that name the classes, curves and bars that tell
missing values from zeros."""

from __future__ import annotations

import numpy as np
from PIL import Image

from segflow import IGNORE_INDEX
from segflow.data.imageio import read_mask, write_mask
from segflow.inference.visualize import (
    Example,
    error_map,
    learning_curves_figure,
    overlay,
    overlay_figure,
    palette,
    per_class_iou_figure,
)

CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
           "bicyclist"]


def test_a_palette_mask_shows_colours_and_reads_back_as_its_indices(tmp_path):
    mask = np.arange(20 * 12, dtype=np.uint8).reshape(20, 12) % len(CLASSES)
    mask[0, :3] = IGNORE_INDEX
    write_mask(tmp_path / "mask.png", mask, palette(len(CLASSES)))
    with Image.open(tmp_path / "mask.png") as img:
        assert img.mode == "P"
        shown = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)
    np.testing.assert_array_equal(shown, palette(len(CLASSES))[mask])  # what a viewer shows: the overlays' colours
    write_mask(tmp_path / "plain.png", mask)  # without a palette (ingested masks): grayscale as before
    with Image.open(tmp_path / "plain.png") as img:
        assert img.mode == "L"


def test_palette_colours_are_distinct_and_ignore_is_white():
    for num_classes in (2, 11, 20, 40):
        colours = palette(num_classes)
        assert len({tuple(c) for c in colours[:num_classes]}) == num_classes
        assert tuple(colours[IGNORE_INDEX]) == (255, 255, 255)


def test_overlays_keep_ignored_pixels_and_the_error_map_tells_right_wrong_and_ignored_apart():
    image = np.full((4, 6, 3), 100, np.uint8)
    truth = np.array([[0] * 6, [1] * 6, [IGNORE_INDEX] * 6, [2] * 6], np.uint8)
    prediction = np.array([[0] * 6, [2] * 6, [0] * 6, [2] * 6], np.uint8)
    drawn = overlay(image, truth, 3)
    np.testing.assert_array_equal(drawn[2], image[2])  # ignored: the image as it is
    assert not np.array_equal(drawn[0], image[0]) and not np.array_equal(drawn[0, 0], drawn[1, 0])
    errors = error_map(image, truth, prediction)
    right, wrong, ignored = errors[0, 0], errors[1, 0], errors[2, 0]
    assert len({tuple(right), tuple(wrong), tuple(ignored)}) == 3
    np.testing.assert_array_equal(errors[3, 0], right)  # row 3 is right too


def test_the_overlay_figure_names_the_image_its_iou_and_the_classes_it_shows():
    truth = np.zeros((30, 40), np.uint8)
    truth[10:20, 10:30] = 3  # road
    truth[:2] = IGNORE_INDEX
    prediction = np.zeros_like(truth)
    prediction[15:, :] = 8  # car
    example = Example("0001TP_008550", np.zeros((30, 40, 3), np.uint8), truth, prediction, iou=0.25)
    fig = overlay_figure(example, CLASSES, rank=2, of_images=233)
    assert "0001TP_008550" in fig.get_suptitle() and "IoU 0.250" in fig.get_suptitle()
    assert "2nd worst of 233" in fig.get_suptitle()
    legends = {legend.get_title().get_text(): [t.get_text() for t in legend.get_texts()] for legend in fig.legends}
    assert legends == {"errors": ["right", "wrong", "ignored"], "classes": ["sky", "road", "car"]}
    assert [ax.get_title() for ax in fig.axes] == ["image", "errors", "truth", "prediction"]


def test_learning_curves_skip_epochs_not_validated_and_star_the_best():
    history = [{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.7, "val_miou": 0.3},
               {"epoch": 3, "train_loss": 0.6, "val_miou": None}, {"epoch": 4, "train_loss": 0.5, "val_miou": 0.5},
               {"epoch": 5, "train_loss": 0.4, "val_miou": 0.4}]
    loss_ax, miou_ax = learning_curves_figure(history).axes
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5]
    val_line, best = miou_ax.lines
    assert list(val_line.get_xdata()) == [2, 4, 5] and list(val_line.get_ydata()) == [0.3, 0.5, 0.4]
    assert (list(best.get_xdata()), best.get_label()) == ([4], "best: 0.500 at epoch 4")


def test_the_learning_curves_mark_where_training_stopped_and_why():
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_miou": v} for e, v in [(1, 0.3), (2, 0.5), (3, 0.4)]]
    stopped = {"epoch": 3, "max_epochs": 10, "reason": "patience", "patience": 1, "still_improving": False}
    loss_ax, miou_ax = learning_curves_figure(history, stopped).axes
    assert [line.get_xdata()[0] for ax in (loss_ax, miou_ax) for line in ax.lines if line.get_linestyle() == "--"] == [3, 3]
    assert miou_ax.get_title() == "stopped at epoch 3 of 10: no better val mIoU in 1 validations (train.patience)"
    improving = {**stopped, "epoch": 10, "reason": "epochs", "still_improving": True}
    assert "raise train.epochs" in learning_curves_figure(history, improving).axes[1].get_title()


def test_the_per_class_bars_mark_a_class_absent_from_the_split_na_not_zero():
    fig = per_class_iou_figure({"sky": 0.8123, "building": None, "pole": 0.0}, miou=0.406)
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["sky", "building", "pole"]
    assert [text.get_text() for text in ax.texts] == ["0.81", "n/a", "0.00"]
    assert "mIoU 0.406" in ax.get_title()
