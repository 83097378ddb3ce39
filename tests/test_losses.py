import pytest
import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX
from segflow.losses import pixel_weighted_cross_entropy, segmentation_loss


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    return logits, target


def test_unweighted_loss_equals_cross_entropy():
    logits, target = _batch()
    loss = pixel_weighted_cross_entropy(logits, target, torch.ones(2))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


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
