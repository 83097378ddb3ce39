"""Augmentation of whole batches on the device: masks stay on their pixels, ranges hold."""


import pytest
import torch

from segflow import IGNORE_INDEX
from segflow.config import AugmentParams
from segflow.data.datasets import BatchAugment, stack_padded
from segflow.inference.card import MEAN, STD


def _coordinate_batch(sizes, axis):
    """uint8 images whose channel 0 holds each pixel's column and channel 1 its row; masks hold the column
    (``axis`` -1) or the row (-2). Padded to the largest, as the loader collates them."""
    images, masks = [], []
    for height, width in sizes:
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        images.append(torch.stack([cols, rows, torch.zeros_like(rows)]).to(torch.uint8))
        masks.append((cols if axis == -1 else rows).to(torch.uint8))
    return stack_padded(images), stack_padded(masks, IGNORE_INDEX), torch.tensor(sizes)


def _pixel_values(images):
    """Undo the normalisation: values on the uint8 scale."""
    return (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255


SIZES = [(40, 30), (20, 36), (32, 32), (50, 45)] * 4


def test_batch_augmentation_keeps_masks_on_their_pixels_and_ignores_what_lies_outside():
    augment = BatchAugment(AugmentParams(hflip=True, scale_min=0.6, scale_max=1.6), crop_size=32)
    draws = torch.rand(len(SIZES), 4, generator=torch.Generator().manual_seed(0))
    for axis, channel in [(-1, 0), (-2, 1)]:
        images, masks = augment(*_coordinate_batch(SIZES, axis), draws)
        assert images.shape == (len(SIZES), 3, 32, 32) and masks.shape == (len(SIZES), 32, 32)
        assert masks.dtype == torch.long
        labeled = masks != IGNORE_INDEX
        coordinate = _pixel_values(images)[:, channel]
        # bilinear image and nearest-centre mask sample the same point: at most half a pixel apart
        assert (coordinate - masks)[labeled].abs().max() <= 0.5 + 1e-3
        assert torch.all(images.permute(1, 0, 2, 3)[:, ~labeled] == 0)  # outside: the mean colour
        assert labeled.any(dim=(1, 2)).all() and not labeled.all()

    # At scale 1 the 20x36 image fills the crop's first 20 rows; below them, padding.
    unscaled = BatchAugment(AugmentParams(hflip=False, scale_min=1.0, scale_max=1.0), crop_size=32)
    _, masks = unscaled(*_coordinate_batch([(20, 36)], -1), torch.rand(1, 4))
    assert torch.all(masks[0, 20:] == IGNORE_INDEX) and torch.all(masks[0, :20] != IGNORE_INDEX)


@pytest.mark.parametrize("hflip", [True, False])
def test_batch_augmentation_scales_and_flips_within_the_configured_ranges(hflip):
    params = AugmentParams(hflip=hflip, scale_min=0.6, scale_max=1.6)
    augment = BatchAugment(params, crop_size=24)
    batch = _coordinate_batch(SIZES, -1)
    outputs = [augment(*batch, torch.rand(len(SIZES), 4, generator=torch.Generator().manual_seed(1)))
               for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*outputs))  # the draws decide everything
    images, masks = outputs[0]
    columns = _pixel_values(images)[:, 0]
    # Source columns per output column, from the middle row's interior (the edges are clamped).
    steps = [(columns[b, 12, 1:] - columns[b, 12, :-1])[masks[b, 12, 1:] != IGNORE_INDEX][2:-2].median().item()
             for b in range(len(SIZES))]
    scales = [1 / abs(step) for step in steps]
    assert all(params.scale_min * 0.95 <= scale <= params.scale_max * 1.05 for scale in scales)
    assert max(scales) - min(scales) > 0.3  # drawn, not fixed
    flipped = [step < 0 for step in steps]
    assert any(flipped) and not all(flipped) if hflip else not any(flipped)
