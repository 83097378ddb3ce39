import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segflow import IGNORE_INDEX
from segflow.config import AugmentParams, ConsistencyParams, StrongAugmentParams, parse_params
from segflow.data.datasets import Sample
from segflow.data.imageio import write_image, write_mask
from segflow.training.class_balance import unlabeled_class_weight
from segflow.training.consistency import (
    ConsistencyTargets,
    TargetStatistics,
    UnlabeledViews,
    batchnorm_statistics_frozen,
    consistency_loss,
    consistency_targets,
    sigmoid_rampup,
    unlabeled_batches,
)
from segflow.training.distributed import EpochSampler, SeededDataset
from segflow.training.loop import TrainStep
from segflow.training.losses import LossWeighting
from segflow.training.optim import Optimization

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
    batch = {"weak": torch.zeros_like(strong), "strong": strong, "valid": valid, "box": box,
             "truth": torch.full((batch_size, size, size), IGNORE_INDEX)}

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
    targets = ConsistencyTargets(torch.zeros(2, 3, 4, 4), target, confident & valid, valid, torch.full_like(target, 255))
    expected = F.cross_entropy(logits, target, reduction="none")[confident & valid].sum() / valid.sum()
    assert consistency_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)

    class_weight = torch.tensor([0.5, 1.0, 3.0])  # as the labeled loss weighs them
    weighted = F.cross_entropy(logits, target, weight=class_weight, reduction="none")
    expected = weighted[confident & valid].sum() / class_weight[target][valid].sum()
    assert consistency_loss(logits, targets, class_weight).item() == pytest.approx(expected.item(), rel=1e-6)

    nothing = ConsistencyTargets(targets.strong, target, torch.zeros_like(valid), valid, targets.truth)
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
            "box": torch.zeros(2, size, size, dtype=torch.bool), "truth": torch.full((2, size, size), IGNORE_INDEX)}


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


def _logits_of(probabilities: list[list[float]]) -> torch.Tensor:
    """1xKx1xN logits whose softmax at pixel n is ``probabilities[n]``."""
    return torch.tensor(probabilities).log().T.reshape(1, len(probabilities[0]), 1, len(probabilities))


def _one_image_batch(pixels: int, truth: list[int] | None = None) -> dict[str, torch.Tensor]:
    weak = torch.zeros(1, 3, 1, pixels)
    return {"weak": weak, "strong": weak, "valid": torch.ones(1, 1, pixels, dtype=torch.bool),
            "box": torch.zeros(1, 1, pixels, dtype=torch.bool),
            "truth": torch.tensor([[truth or [IGNORE_INDEX] * pixels]])}


def test_targets_undo_the_class_weighted_prior_and_the_unlabeled_loss_weighs_classes_as_the_labeled_one():
    """Two classes, weights 1 and 4: a teacher trained with them says 0.4 / 0.6 where the posterior is
    0.4 / (0.6 / 4) renormalised = 0.727 / 0.273. The target is class 0, confident at 0.7; the raw softmax would
    give class 1 at 0.6, below the threshold."""
    class_weight = torch.tensor([1.0, 4.0])
    teacher = _constant_forward(_logits_of([[0.4, 0.6]]))
    cfg, cpu = ConsistencyParams(threshold=0.7), torch.device("cpu")
    targets = consistency_targets(teacher, _one_image_batch(1), cfg, cpu, class_weight)
    assert targets.target.item() == 0 and targets.confident.item()
    raw = consistency_targets(teacher, _one_image_batch(1), cfg, cpu)
    assert raw.target.item() == 1 and not raw.confident.item()

    # The student's loss on that pixel: -log softmax(student)[0], weighted by class 0's weight over the image
    # pixels' weights (one pixel: 1 / 1), as weighted cross-entropy on a labeled pixel would be.
    student = torch.tensor([[[[0.3]], [[1.1]]]]).reshape(1, 2, 1, 1)
    expected = -torch.log_softmax(student, 1)[0, 0].item()
    assert consistency_loss(student, targets, class_weight).item() == pytest.approx(expected)
    # train.unlabeled_class_weighting's default gives the unlabeled loss the labeled loss's weights
    default = parse_params({}).train.unlabeled_class_weighting
    assert unlabeled_class_weight(class_weight, default) is class_weight


class _ConstantTrainable(torch.nn.Module):
    """Fixed logits plus a zero-initialised trainable offset: a model TrainStep can take a step with."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return self.logits.expand(images.shape[0], -1, *images.shape[-2:]) + self.offset


def test_training_step_corrects_the_targets_with_its_class_weights_and_counts_them_per_class():
    class_weight = torch.tensor([1.0, 4.0])
    model = _ConstantTrainable(_logits_of([[0.4, 0.6]] * 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimization = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                                torch.amp.GradScaler("cpu", enabled=False))
    step = TrainStep(model, optimization, LossWeighting(class_weight=class_weight, unlabeled_class_weight=class_weight),
                     device=torch.device("cpu"), consistency=ConsistencyParams(weight=1.0, threshold=0.7))
    labeled = {"image": torch.zeros(1, 3, 1, 3), "mask": torch.zeros(1, 1, 3, dtype=torch.long),
               "pseudo": torch.zeros(1, dtype=torch.bool)}
    step.forward_backward(labeled, unlabeled=_one_image_batch(3, truth=[0, 1, IGNORE_INDEX]))
    record = step.unlabeled_target_record(["road", "pavement"])
    # every pixel becomes a confident class 0 target (uncorrected: class 1, none confident); one of the two
    # scored ones is right
    assert record == {"unlabeled_confident": 1.0, "unlabeled_confident.road": 1.0,
                      "unlabeled_precision": 0.5, "unlabeled_precision.road": 0.5}
    assert step.unlabeled_target_record(["road", "pavement"])["unlabeled_confident"] == 0.0  # reset


def test_class_balanced_thresholds_let_an_unsure_class_keep_its_surer_half():
    """Class 1 is predicted at 0.6345 on two pixels and 0.8345 on two: the global 0.95 keeps none of them;
    class-balanced with keep 0.5 lowers class 1's threshold to its surer half. Class 0 (0.99) keeps 0.95."""
    teacher = _constant_forward(_logits_of([[0.99, 0.01], [0.99, 0.01], [0.3655, 0.6345], [0.3655, 0.6345],
                                            [0.1655, 0.8345], [0.1655, 0.8345]]))
    batch, cpu = _one_image_batch(6), torch.device("cpu")
    global_only = consistency_targets(teacher, batch, ConsistencyParams(threshold=0.95), cpu)
    assert global_only.confident[0, 0].tolist() == [True, True, False, False, False, False]
    balanced = consistency_targets(teacher, batch, ConsistencyParams(threshold=0.95, class_balanced=True,
                                                                    class_keep_fraction=0.5), cpu)
    assert balanced.confident[0, 0].tolist() == [True, True, False, False, True, True]
    assert balanced.target[0, 0].tolist() == [0, 0, 1, 1, 1, 1]


def test_target_statistics_share_and_precision_per_class():
    statistics = TargetStatistics(3, torch.device("cpu"))
    valid = torch.tensor([[[True, True, True, True, False]]])
    targets = ConsistencyTargets(
        strong=torch.zeros(1, 3, 1, 5), target=torch.tensor([[[0, 0, 1, 1, 2]]]),
        confident=torch.tensor([[[True, False, True, True, False]]]), valid=valid,
        truth=torch.tensor([[[0, 1, 0, IGNORE_INDEX, 2]]]))
    statistics.update(targets)
    record = statistics.summary(["a", "b", "c"])
    assert record == {"unlabeled_confident": 0.75, "unlabeled_confident.a": 0.5, "unlabeled_confident.b": 1.0,
                      "unlabeled_precision": 0.5, "unlabeled_precision.a": 1.0, "unlabeled_precision.b": 0.0}


def test_unlabeled_views_carry_a_hidden_mask_through_the_crop_as_truth(tmp_path):
    rng = np.random.default_rng(1)
    write_image(tmp_path / "u.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    mask = rng.integers(0, 3, (20, 24)).astype(np.uint8)
    mask[:4] = IGNORE_INDEX  # void rows
    write_mask(tmp_path / "u_mask.png", mask)
    hidden = Sample("u", tmp_path / "u.png", tmp_path / "u_mask.png")
    views = _views([hidden], crop_size=28, hflip=False, scale_min=1.0, scale_max=1.0)
    item = views[0]
    assert torch.equal(item["truth"][:20, :24], torch.from_numpy(mask).long())  # void stays ignore
    assert (item["truth"][20:] == IGNORE_INDEX).all() and (item["truth"][:, 24:] == IGNORE_INDEX).all()
    assert item["valid"][:20, :24].all() and not item["valid"][20:].any()  # void rows are image, not padding
    no_mask = _views([Sample("u", tmp_path / "u.png", None)], crop_size=28, hflip=False, scale_min=1.0,
                     scale_max=1.0)[0]
    assert (no_mask["truth"] == IGNORE_INDEX).all() and torch.equal(no_mask["valid"], item["valid"])
