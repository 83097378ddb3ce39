import logging
import resource
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segflow import IGNORE_INDEX
from segflow.config import Layout, parse_params
from segflow.data import Sample
from segflow.errors import SegflowError
from segflow.imageio import write_mask
from segflow.train import (
    CompiledOrEager,
    median_frequency_weights,
    pixel_weighted_cross_entropy,
    prepare_model,
    segmentation_loss,
    train,
)

from train_testing import NO_AUGMENT, PLAIN_UNET, SIZE, make_project, weights


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


def test_median_frequency_weights_follow_the_segnet_formula(tmp_path):
    # image a: 12 px of class 0, 4 px of class 1; image b: 8 px of class 0, 8 px of class 2 (+ ignored pixels).
    a = np.array([0] * 12 + [1] * 4, dtype=np.uint8).reshape(4, 4)
    b = np.array([0] * 8 + [2] * 8 + [IGNORE_INDEX] * 4, dtype=np.uint8).reshape(4, 5)
    samples = []
    for name, mask in [("a", a), ("b", b)]:
        write_mask(tmp_path / f"{name}.png", mask)
        samples.append(Sample(name, tmp_path / f"{name}.png", tmp_path / f"{name}.png"))
    weights = median_frequency_weights(samples, num_classes=4)
    frequency = np.array([20 / 32, 4 / 16, 8 / 16])  # pixels of c / pixels of the images containing c
    expected = np.median(frequency) / frequency
    assert weights[:3].numpy() == pytest.approx(expected, rel=1e-6)
    assert weights[3].item() == 1.0  # never seen: left alone


@pytest.fixture(scope="module")
def plain_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), train=16)


def _plain_params(**train):
    return parse_params({
        "train": {"epochs": 1, "crop_size": SIZE, "device": "cpu", "optimizer": "sgd", "lr": 0.05,
                  "use_pseudo_labels": False, "augment": NO_AUGMENT, **train},
        "models": {"unet_original": PLAIN_UNET},
        "evaluate": {"batch_size": 2},
    })


def test_two_accumulated_batches_of_4_train_like_one_batch_of_8(plain_project, tmp_path):
    results = {}
    for name, batch, accumulate in [("batch8", 8, 1), ("accumulated", 4, 2)]:
        train(_plain_params(batch_size=batch, accumulate_steps=accumulate), "unet_original",
              data_dir=plain_project / Layout.ingested, splits_csv=plain_project / Layout.splits, out_dir=tmp_path / name)
        results[name] = weights(tmp_path / name)
    for name, expected in results["batch8"].items():
        torch.testing.assert_close(results["accumulated"][name], expected, rtol=1e-4, atol=1e-6)


def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    module = torch.nn.Conv2d(3, 2, 1)
    forward = CompiledOrEager(module)
    x = torch.randn(1, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="segflow.train"):
        outputs = [forward(x), forward(x)]
    assert all(torch.equal(out, module(x)) for out in outputs)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == len(caplog.records) == 1
    assert "no C++ compiler" in caplog.records[0].message


@pytest.mark.skipif(sys.platform != "linux", reason="a glibc malloc setting")
def test_cpu_training_reuses_freed_memory_without_page_faults():
    """What a CPU step frees (here 64 MiB of 256 KiB tensors, like a model's gradients) comes back without the OS
    paging it in anew; glibc's defaults would give the heap's top back (segflow.train.keep_freed_memory)."""
    prepare_model(torch.nn.Linear(1, 1), torch.device("cpu"))

    def step() -> None:
        tensors = [torch.ones(64 * 1024) for _ in range(256)]
        del tensors

    step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 1000  # 16384 pages when given back


def test_a_student_can_start_from_its_teachers_weights(plain_project, tmp_path):
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": plain_project / Layout.splits}
    train(_plain_params(batch_size=8), "unet_original", out_dir=tmp_path / "teacher", **data)
    # A learning rate too small to move the weights: what comes out is what went in.
    train(_plain_params(batch_size=8, lr=1e-12), "unet_original", out_dir=tmp_path / "student",
          init_from=tmp_path / "teacher", **data)
    teacher, student = weights(tmp_path / "teacher"), weights(tmp_path / "student")
    for name, expected in teacher.items():
        torch.testing.assert_close(student[name], expected, rtol=0, atol=1e-6)

    with pytest.raises(SegflowError, match="architecture and classes must be the same"):
        train(_plain_params(), "fcn8s", out_dir=tmp_path / "other", init_from=tmp_path / "teacher", **data)
