import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segflow.config import AugmentParams, ConsistencyParams, StrongAugmentParams
from segflow.consistency import (
    ConsistencyTargets,
    UnlabeledViews,
    batchnorm_statistics_frozen,
    consistency_loss,
    consistency_targets,
    sigmoid_rampup,
    unlabeled_batches,
)
from segflow.data import Sample
from segflow.distributed import EpochSampler, SeededDataset
from segflow.imageio import write_image

NO_STRONG = StrongAugmentParams(color_jitter=0, grayscale=0, blur=0, cutout=0)


@pytest.fixture
def unlabeled_images(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for number in range(6):
        path = tmp_path / f"u{number}.png"
        write_image(path, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        samples.append(Sample(f"u{number}", path, None))
    return samples


def _views(samples, crop_size=16, strong=NO_STRONG, cutmix=0.0, **augment):
    return UnlabeledViews(samples, crop_size=crop_size, augment=AugmentParams(**augment), strong=strong, cutmix=cutmix)


def test_without_strong_perturbations_the_strong_view_is_the_weak_one(unlabeled_images):
    item = _views(unlabeled_images)[0]
    torch.testing.assert_close(item["strong"], item["weak"])
    assert not item["box"].any()
    assert item["valid"].all()  # crop inside the image: no padding


def test_strong_view_is_the_same_crop_perturbed_and_padding_is_not_valid(unlabeled_images):
    """Colour jitter changes the pixels, not where they come from: a crop larger than the image is padded
    in both views at the same place, and those pixels are marked invalid."""
    torch.manual_seed(0)
    item = _views(unlabeled_images, crop_size=28, strong=StrongAugmentParams(color_jitter=1, grayscale=0, blur=0, cutout=0),
                  hflip=False, scale_min=1.0, scale_max=1.0)[0]
    assert item["weak"].shape == item["strong"].shape == (3, 28, 28)
    assert not torch.equal(item["strong"], item["weak"])
    valid = item["valid"]
    assert valid[:20, :24].all() and not valid[20:].any() and not valid[:, 24:].any()
    for view in ("weak", "strong"):  # padding: the mean colour, 0 once normalised
        assert item[view][:, ~valid].abs().max() < 1e-6


def test_cutmix_draws_a_box_with_its_probability(unlabeled_images):
    views = _views(unlabeled_images, cutmix=1.0)
    boxes = [views[i]["box"] for i in range(len(unlabeled_images))]
    assert all(box.any() and not box.all() for box in boxes)
    rows, cols = boxes[0].nonzero(as_tuple=True)  # one rectangle
    assert boxes[0][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


class _Constant(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def _constant_forward(logits):
    return _Constant(logits)


def test_targets_keep_confident_image_pixels_and_cutmix_moves_image_and_targets_together():
    batch_size, size = 2, 4
    logits = torch.zeros(batch_size, 3, size, size)
    logits[0, 1] = 10.0           # crop 0: class 1, confident
    logits[1, 2, :, :2] = 10.0    # crop 1: class 2 confident on the left half, uncertain on the right
    valid = torch.ones(batch_size, size, size, dtype=torch.bool)
    valid[0, 3] = False           # crop 0's last row is padding
    box = torch.zeros(batch_size, size, size, dtype=torch.bool)
    box[0, :2, :2] = True         # crop 0 gets crop 1's top-left corner
    strong = torch.stack([torch.full((3, size, size), 1.0), torch.full((3, size, size), 2.0)])
    batch = {"weak": torch.zeros_like(strong), "strong": strong, "valid": valid, "box": box}

    targets = consistency_targets(_constant_forward(logits), batch, ConsistencyParams(threshold=0.9), torch.device("cpu"))

    assert torch.equal(targets.strong[0, :, :2, :2], torch.full((3, 2, 2), 2.0))
    assert torch.equal(targets.strong[0, :, 2:], torch.full((3, 2, size), 1.0))
    assert torch.equal(targets.target[0, :2, :2], torch.full((2, 2), 2))
    assert (targets.target[0, 2:] == 1).all()
    assert targets.confident[0, :2, :2].all()       # crop 1's left half is confident
    assert targets.confident[0, 2].all() and not targets.confident[0, 3].any()  # padding teaches nothing
    assert targets.confident[1, :, :2].all() and not targets.confident[1, :, 2:].any()
    assert torch.equal(targets.strong[1], strong[1])  # no box: untouched


def test_consistency_loss_is_cross_entropy_on_confident_pixels_over_all_image_pixels_class_weighted_or_not():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    confident = torch.rand(2, 4, 4) > 0.5
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, 0] = False
    targets = ConsistencyTargets(torch.zeros(2, 3, 4, 4), target, confident & valid, valid)
    expected = F.cross_entropy(logits, target, reduction="none")[confident & valid].sum() / valid.sum()
    assert consistency_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)

    class_weight = torch.tensor([0.5, 1.0, 3.0])  # as the labeled loss weighs them
    weighted = F.cross_entropy(logits, target, weight=class_weight, reduction="none")
    expected = weighted[confident & valid].sum() / class_weight[target][valid].sum()
    assert consistency_loss(logits, targets, class_weight).item() == pytest.approx(expected.item(), rel=1e-6)

    nothing = ConsistencyTargets(targets.strong, target, torch.zeros_like(valid), valid)
    assert consistency_loss(logits, nothing).item() == 0.0


def test_unlabeled_stream_started_at_a_batch_gives_the_batches_an_uninterrupted_stream_gives(unlabeled_images):
    def stream(first):
        sampler = EpochSampler(len(unlabeled_images), seed=3)
        loader = DataLoader(SeededDataset(_views(unlabeled_images, cutmix=0.5, strong=StrongAugmentParams())),
                            batch_size=2, sampler=sampler, drop_last=True)
        return unlabeled_batches(loader, first)

    uninterrupted = list(itertools.islice(stream(0), 8))  # 3 batches an epoch: crosses two epoch ends
    resumed = list(itertools.islice(stream(4), 4))
    for expected, got in zip(uninterrupted[4:], resumed):
        for key in expected:
            assert torch.equal(expected[key], got[key]), key
    assert not torch.equal(uninterrupted[0]["weak"], uninterrupted[3]["weak"])  # a new epoch, a new order


class _DropoutNet(torch.nn.Module):
    """Conv, batch norm, Dropout(0.5) (as in SMP DeepLabV3+'s ASPP projection), classifier."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.Dropout(0.5))
        self.classifier = torch.nn.Conv2d(8, 3, 1)

    def forward(self, images):
        return self.classifier(self.features(images))


def _batch(seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    weak = torch.randn(2, 3, size, size, generator=generator)
    return {"weak": weak, "strong": weak + 3, "valid": torch.ones(2, size, size, dtype=torch.bool),
            "box": torch.zeros(2, size, size, dtype=torch.bool)}


def test_targets_are_predicted_in_eval_mode_and_the_model_goes_back_to_training():
    """A model in training mode with dropout gives the same targets twice (dropout off, running statistics),
    and stays in training mode."""
    torch.manual_seed(0)
    model = _DropoutNet().train()
    batch, cfg = _batch(), ConsistencyParams(threshold=0.0)
    first = consistency_targets(model, batch, cfg, torch.device("cpu"))
    second = consistency_targets(model, batch, cfg, torch.device("cpu"))
    assert torch.equal(first.target, second.target)
    assert model.training and model.features[3].training
    with torch.no_grad():  # in training mode the same images do not give the same predictions
        assert not torch.equal(model(batch["weak"]), model(batch["weak"]))


def test_strong_views_leave_batch_norm_running_statistics_alone_but_are_normalised_by_their_own():
    torch.manual_seed(0)
    model = _DropoutNet().train()
    norm = model.features[1]
    model(torch.randn(4, 3, 8, 8))  # some running statistics to keep
    before = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    strong = torch.randn(4, 3, 8, 8) * 5 + 2
    with batchnorm_statistics_frozen(model):
        model(strong)
        batch_mean = model.features[0](strong).mean(dim=(0, 2, 3))
    for name, buffer in norm.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert norm.track_running_stats  # back on afterwards
    model(strong)  # without the context they move
    assert not torch.equal(norm.running_mean, before["running_mean"])
    assert not torch.allclose(batch_mean, before["running_mean"])  # the strong batch's statistics differ


def test_sigmoid_rampup_rises_from_near_zero_to_one_and_stays():
    assert sigmoid_rampup(0, 100) == pytest.approx(np.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(np.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up
    values = [sigmoid_rampup(step, 100) for step in range(101)]
    assert values == sorted(values)
