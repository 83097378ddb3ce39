import math

import numpy as np
import pytest
import torch

from segflow import IGNORE_INDEX
from segflow.inference.metrics import ConfusionMatrix, scores


def test_confusion_matrix_counts_rows_as_truth_and_skips_ignore():
    truth = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    prediction = torch.tensor([[0, 1, 1], [1, 0, 2]])
    confusion = ConfusionMatrix(3)
    confusion.update(truth, prediction)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(confusion.matrix.numpy(), expected)


def test_scores_match_hand_computed_values():
    # truth 0: 3 px (2 right, 1 as class 1); truth 1: 2 px (right); truth 2: 1 px (predicted 0)
    confusion = np.array([[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    result = scores(confusion)
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 0 / (1 + 0 - 0)]
    assert result["per_class_iou"] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(sum(iou) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    dice = [2 * 2 / (3 + 3), 2 * 2 / (2 + 3), 0.0]
    assert result["per_class_dice"] == pytest.approx(dice)
    assert result["mean_dice"] == pytest.approx(sum(dice) / 3)


def test_class_absent_from_truth_and_prediction_is_nan_and_left_out_of_means():
    confusion = np.array([[3, 1, 0], [1, 5, 0], [0, 0, 0]])
    result = scores(confusion)
    assert math.isnan(result["per_class_iou"][2])
    assert math.isnan(result["per_class_accuracy"][2])
    assert result["miou"] == pytest.approx((3 / 5 + 5 / 7) / 2)


def test_class_predicted_but_never_true_counts_as_zero_iou():
    confusion = np.array([[3, 1], [0, 0]])
    result = scores(confusion)
    assert result["per_class_iou"] == pytest.approx([0.75, 0.0])
    assert math.isnan(result["per_class_accuracy"][1])
    assert result["miou"] == pytest.approx(0.375)


def test_empty_confusion_gives_nan_not_an_error():
    result = scores(np.zeros((2, 2)))
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])


def test_accumulates_over_batches():
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    confusion.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    np.testing.assert_array_equal(confusion.matrix.numpy(), [[1, 0], [1, 2]])
