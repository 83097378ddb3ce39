import math

import pytest
import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX
from segflow.config import LossParams
from segflow.training.losses import ohem_pixels, pixel_weighted_cross_entropy, segmentation_loss


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    return logits, target


def test_unweighted_loss_equals_cross_entropy():
    logits, target = _batch()
    loss = pixel_weighted_cross_entropy(logits, target, torch.ones(2))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


def test_unweighted_loss_with_ignored_pixels_equals_cross_entropys_ignore_index():
    """The mean runs over the labeled pixels only: counting ignored ones in the denominator would shrink it."""
    logits, target = _batch()
    target[:, :3] = IGNORE_INDEX  # 12 of 32 pixels
    loss = pixel_weighted_cross_entropy(logits, target, torch.ones(2))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX).item(), rel=1e-6)


def test_ignored_pixels_do_not_change_the_loss():
    logits, target = _batch()
    ignored = target.clone()
    ignored[:, :2] = IGNORE_INDEX
    changed_logits = logits.clone()
    changed_logits[:, :, :2] = 100 * torch.randn_like(changed_logits[:, :, :2])  # garbage where ignored
    a = pixel_weighted_cross_entropy(logits, ignored, torch.ones(2))
    b = pixel_weighted_cross_entropy(changed_logits, ignored, torch.ones(2))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    logits.requires_grad_(True)
    pixel_weighted_cross_entropy(logits, ignored, torch.ones(2)).backward()
    assert torch.all(logits.grad[:, :, :2] == 0)


def test_pseudo_weight_scales_an_image_contribution():
    logits, target = _batch()
    per_image = [F.cross_entropy(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    loss = pixel_weighted_cross_entropy(logits, target, torch.tensor([1.0, 0.25]))
    assert loss.item() == pytest.approx((per_image[0] + 0.25 * per_image[1]) / 1.25, rel=1e-5)


def test_all_ignored_gives_zero_not_nan():
    logits, _ = _batch()
    target = torch.full((2, 4, 4), IGNORE_INDEX)
    assert pixel_weighted_cross_entropy(logits, target, torch.ones(2)).item() == 0.0


def test_auxiliary_output_is_added_with_its_weight():
    logits, target = _batch()
    aux = torch.randn_like(logits)
    main = pixel_weighted_cross_entropy(logits, target, torch.ones(2))
    aux_loss = pixel_weighted_cross_entropy(aux, target, torch.ones(2))
    total = segmentation_loss({"out": logits, "aux": aux}, target, torch.ones(2), aux_weight=0.4)
    assert total.item() == pytest.approx(main.item() + 0.4 * aux_loss.item(), rel=1e-6)
    assert segmentation_loss(logits, target, torch.ones(2), aux_weight=0.4).item() == pytest.approx(main.item())


def test_class_weights_match_weighted_cross_entropy_with_ignored_pixels():
    logits, target = _batch()
    target[0, 0] = IGNORE_INDEX
    class_weight = torch.tensor([0.5, 2.0, 4.0])
    loss = pixel_weighted_cross_entropy(logits, target, torch.ones(2), class_weight)
    expected = F.cross_entropy(logits, target, weight=class_weight, ignore_index=IGNORE_INDEX)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# Two pixels, two classes, worked by hand: pixel a has logits (0, 0), so p = (0.5, 0.5), and is class 0; pixel b
# has logits (ln 3, 0), so p = (0.75, 0.25), and is class 1.
HAND_LOGITS = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
HAND_TARGET = torch.tensor([[[0, 1]]])


def _hand_loss(**loss) -> float:
    return segmentation_loss(HAND_LOGITS, HAND_TARGET, torch.ones(1), 0.0, loss=LossParams(**loss)).item()


@pytest.mark.parametrize("loss, expected", [
    # -(ln 0.5 + ln 0.25) / 2
    ({}, (math.log(2) + math.log(4)) / 2),
    # targets (0.9, 0.1) and (0.1, 0.9): a keeps ln 2; b: -(0.1 ln 0.75 + 0.9 ln 0.25)
    ({"label_smoothing": 0.2}, (math.log(2) - 0.1 * math.log(0.75) - 0.9 * math.log(0.25)) / 2),
    # true-class probabilities 0.5 and 0.25: below max(0.4, the 2nd hardest's 0.5) only b counts
    ({"ohem_threshold": 0.4, "ohem_min_kept": 1}, math.log(4)),
    # a threshold above both keeps both
    ({"ohem_threshold": 0.9, "ohem_min_kept": 1}, (math.log(2) + math.log(4)) / 2),
    # Dice per class 2I / (sum p + sum y): class 0: 2 * 0.5 / 2.25, class 1: 2 * 0.25 / 1.75; loss = mean(1 - dice)
    ({"cross_entropy": 0.0, "dice": 1.0}, ((1 - 1 / 2.25) + (1 - 0.5 / 1.75)) / 2),
    # Focal per class, one-vs-rest sigmoid, (1 - pt)^2 * -ln pt averaged over pixels, then over classes:
    # class 0 (logits 0, ln 3; truth 1, 0): pt 0.5 and 0.25; class 1 (logits 0, 0; truth 0, 1): pt 0.5 and 0.5
    ({"cross_entropy": 0.0, "focal": 1.0},
     ((0.25 * math.log(2) + 0.5625 * math.log(4)) / 2 + 0.25 * math.log(2)) / 2),
    # Lovasz-Softmax: errors |y - p| sorted, dotted with the Jaccard gradient: class 0: 0.75 * 0.5 + 0.5 * 0.5,
    # class 1: 0.75 * 1 + 0.5 * 0; mean over the classes present
    ({"cross_entropy": 0.0, "lovasz": 1.0}, (0.625 + 0.75) / 2),
    # a weighted sum is the sum of the weighted terms
    ({"cross_entropy": 0.5, "dice": 2.0},
     0.5 * (math.log(2) + math.log(4)) / 2 + 2.0 * ((1 - 1 / 2.25) + (1 - 0.5 / 1.75)) / 2),
])
def test_each_loss_matches_its_value_worked_by_hand(loss, expected):
    assert _hand_loss(**loss) == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_at_least_min_kept_pixels_per_image_the_hardest_first():
    logits, target = _batch()
    kept = ohem_pixels(logits, target, threshold=1e-9, min_kept=5)  # a threshold nothing is below
    assert kept.sum().item() == 2 * 5
    probability = logits.softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    assert probability[kept].max() <= probability[~kept].min()  # the kept ones are the hardest


def test_region_losses_score_only_the_labeled_images_of_a_batch():
    logits, target = _batch()
    pseudo = torch.tensor([False, True])
    loss = LossParams(cross_entropy=0.0, dice=1.0)
    mixed = segmentation_loss(logits, target, torch.ones(2), 0.0, pseudo=pseudo, loss=loss)
    alone = segmentation_loss(logits[:1], target[:1], torch.ones(1), 0.0, loss=loss)
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-6)


def test_a_loss_without_any_term_is_refused():
    with pytest.raises(ValueError, match="at least one of"):
        LossParams(cross_entropy=0.0)
