"""Whole-image vs sliding-window inference and test-time augmentation (segflow.inference.predictor.probabilities)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from segflow import CARD_FILE
from segflow.config import InferenceParams
from segflow.errors import SegflowError
from segflow.inference.card import ModelCard
from segflow.inference.metrics import confusion_over
from segflow.inference.predictor import (
    DEFAULT_MAX_PIXELS,
    logits,
    predict_mask,
    probabilities,
    resolved_inference,
)

NUM_CLASSES = 4


def _pointwise_model() -> nn.Module:
    """A 1×1 convolution: translation- and mirror-equivariant, so tiling and flipping change nothing."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, kernel_size=1).eval()


class _RecordingModel(nn.Module):
    """Records the shape of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _pointwise_model()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape))
        return self.head(images)


def _images(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_sliding_window_equals_whole_image_for_a_translation_equivariant_model():
    model, images = _pointwise_model(), _images(37, 53)  # odd sizes: the last window is moved back to the border
    whole = probabilities(model, images, InferenceParams())
    slide = probabilities(model, images, InferenceParams(mode="slide", crop_size=16, stride=10))
    assert slide.shape == (2, NUM_CLASSES, 37, 53)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(whole, logits(model, images).softmax(1))


def test_image_smaller_than_the_window_is_padded():
    model, images = _pointwise_model(), _images(10, 13)
    slide = probabilities(model, images, InferenceParams(mode="slide", crop_size=16))
    torch.testing.assert_close(slide, probabilities(model, images, InferenceParams()))


@pytest.mark.parametrize("windows_per_batch", [3, 8])
def test_slide_sends_only_windows_in_batches_of_windows_per_batch(windows_per_batch):
    model = _RecordingModel()
    inference = InferenceParams(mode="slide", crop_size=16, windows_per_batch=windows_per_batch)
    out = probabilities(model, _images(50, 70, batch=3), inference)
    assert out.shape == (3, NUM_CLASSES, 50, 70)
    sizes = [n for n, _, h, w in model.shapes if h == w == 16]
    assert len(sizes) == len(model.shapes)  # windows only, never the whole image
    assert max(sizes) == windows_per_batch and sum(sizes) == 3 * 5 * 7  # 5x7 windows of 16 at stride 10


def test_flip_changes_nothing_for_a_mirror_equivariant_model_and_something_otherwise():
    images = _images(20, 27)
    pointwise = _pointwise_model()
    torch.testing.assert_close(probabilities(pointwise, images, InferenceParams(flip=True)),
                               probabilities(pointwise, images, InferenceParams()))
    torch.manual_seed(0)
    lopsided = nn.Conv2d(3, NUM_CLASSES, kernel_size=(1, 3), padding=(0, 1)).eval()  # random, not mirror-symmetric
    plain = probabilities(lopsided, images, InferenceParams())
    flipped = probabilities(lopsided, images, InferenceParams(flip=True))
    assert not torch.allclose(plain, flipped, atol=1e-4)


def test_multi_scale_returns_probabilities_at_the_input_size():
    model, images = _pointwise_model(), _images(23, 31)
    for mode in ("whole", "slide"):
        out = probabilities(model, images, InferenceParams(mode=mode, crop_size=16, scales=[0.5, 1.0, 1.5], flip=True))
        assert out.shape == (2, NUM_CLASSES, 23, 31)
        torch.testing.assert_close(out.sum(1), torch.ones(2, 23, 31))


def test_stride_wider_than_the_window_is_an_error():
    with pytest.raises(SegflowError, match="stride"):
        probabilities(_pointwise_model(), _images(20, 20), InferenceParams(mode="slide", crop_size=16, stride=17))


def test_the_window_left_null_is_the_training_crop_on_the_card(tmp_path):
    card = ModelCard(arch="unet", num_classes=NUM_CLASSES, classes=list("abcd"), crop_size=32)
    resolved = resolved_inference(InferenceParams(mode="slide"), card, tmp_path)
    assert (resolved.crop_size, resolved.stride, resolved.max_pixels) == (32, 21, DEFAULT_MAX_PIXELS)
    own = resolved_inference(InferenceParams(mode="slide", crop_size=16, stride=16), card, tmp_path)
    assert (own.crop_size, own.stride) == (16, 16)
    whole = resolved_inference(InferenceParams(), replace(card, crop_size=1000), tmp_path)
    assert (whole.crop_size, whole.max_pixels) == (None, 16 * 1000 * 1000)  # 16 training windows
    with pytest.raises(SegflowError, match=f"{tmp_path / CARD_FILE}: .*no window size"):
        resolved_inference(InferenceParams(mode="slide"), replace(card, crop_size=None), tmp_path)


def test_predict_mask_with_inference_params():
    image = np.random.default_rng(0).integers(0, 256, (19, 25, 3), dtype=np.uint8)
    model = _pointwise_model()
    mask = predict_mask(model, image, InferenceParams(mode="slide", crop_size=16, flip=True))
    assert mask.shape == (19, 25) and mask.dtype == np.uint8 and mask.max() < NUM_CLASSES
    np.testing.assert_array_equal(mask, predict_mask(model, image))


def test_confusion_over_uses_the_inference_params():
    model, images = _pointwise_model(), _images(21, 30)
    batches = [{"image": images, "mask": torch.randint(0, NUM_CLASSES, (2, 21, 30))}]
    plain = confusion_over(model, batches, NUM_CLASSES, torch.device("cpu")).matrix
    sliding = InferenceParams(mode="slide", crop_size=16)
    slide = confusion_over(model, batches, NUM_CLASSES, torch.device("cpu"), sliding).matrix
    torch.testing.assert_close(slide, plain)
    assert int(plain.sum()) == 2 * 21 * 30


def test_truncated_or_foreign_weights_are_named_not_a_crash(tmp_path):
    from segflow import models
    from segflow.inference.card import ModelCard
    from segflow.inference.predictor import load_model, save_model

    card = ModelCard(arch="fcn32s", num_classes=2, classes=["background", "thing"], options={"width": 0.0625})
    save_model(models.build("fcn32s", num_classes=2, width=0.0625), card, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(SegflowError, match="model.safetensors: cannot read the weights .* truncated"):
        load_model(tmp_path / "model")
    save_model(models.build("fcn32s", num_classes=3, width=0.0625), card, tmp_path / "model")  # 3 classes, card says 2
    with pytest.raises(SegflowError, match="the weights do not fit .* tensors of another shape"):
        load_model(tmp_path / "model")
