"""Class statistics of the labeled masks: SegNet's median-frequency weights, the class prior."""


import numpy as np
import pytest
import torch

from segflow import IGNORE_INDEX
from segflow.data.datasets import Sample
from segflow.data.imageio import write_mask
from segflow.training.class_balance import class_pixels, median_frequency_weights, prior_bias


def test_median_frequency_weights_follow_the_segnet_formula(tmp_path):
    # image a: 12 px of class 0, 4 px of class 1; image b: 8 px of class 0, 8 px of class 2 (+ ignored pixels).
    a = np.array([0] * 12 + [1] * 4, dtype=np.uint8).reshape(4, 4)
    b = np.array([0] * 8 + [2] * 8 + [IGNORE_INDEX] * 4, dtype=np.uint8).reshape(4, 5)
    samples = []
    for name, mask in [("a", a), ("b", b)]:
        write_mask(tmp_path / f"{name}.png", mask)
        samples.append(Sample(name, tmp_path / f"{name}.png", tmp_path / f"{name}.png"))
    pixels, image_pixels = class_pixels(samples, num_classes=4)
    assert pixels.tolist() == [20, 4, 8, 0]
    weights = median_frequency_weights(pixels, image_pixels)
    frequency = np.array([20 / 32, 4 / 16, 8 / 16])  # pixels of c / pixels of the images containing c
    expected = np.median(frequency) / frequency
    assert weights[:3].numpy() == pytest.approx(expected, rel=1e-6)
    assert weights[3].item() == 1.0  # never seen: left alone


def test_prior_bias_is_the_loss_minimising_constant_prediction():
    pixels = np.array([59.0, 29.0, 9.0, 0.0])
    # Softmax of the offsets: each class's share of the pixels, one pixel added to each (101 in all).
    expected = np.array([60, 30, 10, 1]) / 101
    assert torch.softmax(prior_bias(pixels, None), 0).numpy() == pytest.approx(expected, rel=1e-5)
    # With class weights the weighted shares: here weights that equalise them give equal offsets.
    equalising = torch.tensor([1 / 60, 1 / 30, 1 / 10, 1.0])
    assert prior_bias(pixels, equalising).numpy() == pytest.approx([0.0] * 4, abs=1e-5)
