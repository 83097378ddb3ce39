import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from segflow import IGNORE_INDEX
from segflow.config import Layout, parse_params
from segflow.data.datasets import load_samples
from segflow.data.imageio import write_mask
from segflow.errors import SegflowError
from segflow.training import checkpoint
from segflow.training.checkpoint import Checkpointer
from segflow.training.class_balance import class_pixels, median_frequency_weights, prior_bias
from segflow.training.plan import batches_per_rank
from train_testing import NO_AUGMENT, PLAIN_UNET, SIZE, make_project, train_from_params, weights


@pytest.fixture(scope="module")
def plain_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), train=16)


def _plain_params(**train):
    return parse_params({
        "train": {"epochs": 1, "crop_size": SIZE, "device": "cpu", "decoded_cache": False, "optimizer": "sgd", "lr": 0.05,
                  "use_pseudo_labels": False, "augment": NO_AUGMENT, **train},
        "models": {"unet_original": PLAIN_UNET},
        "evaluate": {"batch_size": 2},
    })


def _train_plain(project, out_dir, **train_params):
    train_from_params(_plain_params(**train_params), "unet_original", data_dir=project / Layout.ingested,
          splits_csv=project / Layout.splits, out_dir=out_dir)
    return weights(out_dir)


@pytest.fixture(scope="module")
def batch8_weights(plain_project, tmp_path_factory):
    """One epoch in batches of 8, augmented per image on the CPU (the default there)."""
    return _train_plain(plain_project, tmp_path_factory.mktemp("batch8") / "model", batch_size=8)


@pytest.mark.parametrize("prior_init, power", [(True, None), (False, None), (True, 0.5)])
def test_the_output_bias_starts_at_the_training_masks_class_prior(plain_project, tmp_path, prior_init, power):
    """A learning rate too small to move anything keeps the classifier's bias where training started it; with
    class weighting (its weights to ``power``) the card keeps the weights, and the prior is the weighted one."""
    weighting = {} if power is None else {"class_weighting": True, "class_weight_power": power}
    trained = _train_plain(plain_project, tmp_path / "model", lr=1e-12, prior_init=prior_init, **weighting)
    train = load_samples(plain_project / Layout.ingested, plain_project / Layout.splits, "train")
    num_classes = trained["classifier.bias"].numel()
    pixels, image_pixels = class_pixels(train, num_classes)
    class_weight = None if power is None else median_frequency_weights(pixels, image_pixels) ** power
    expected = prior_bias(pixels, class_weight) if prior_init else torch.zeros(num_classes)
    torch.testing.assert_close(trained["classifier.bias"], expected, rtol=0, atol=1e-5)
    card = json.loads((tmp_path / "model/model.json").read_text())
    assert card["extra"].get("prior_init") == ("classifier.bias" if prior_init else None)
    if power is not None:
        assert card["extra"]["class_weight"] == pytest.approx(class_weight.tolist())
        full = median_frequency_weights(pixels, image_pixels)
        assert card["extra"]["class_weight"] != pytest.approx(full.tolist())  # the power changed them


def test_two_accumulated_batches_of_4_train_like_one_batch_of_8(plain_project, batch8_weights, tmp_path):
    accumulated = _train_plain(plain_project, tmp_path / "accumulated", batch_size=4, accumulate_steps=2)
    for name, expected in batch8_weights.items():
        torch.testing.assert_close(accumulated[name], expected, rtol=1e-4, atol=1e-6)


def test_batch_augmentation_without_random_change_trains_as_per_image(plain_project, batch8_weights, tmp_path):
    """Scale 1, no flip, crop = image size: the uint8 batches normalised on the device are the same data."""
    batched = _train_plain(plain_project, tmp_path / "batched", batch_size=8, batch_augment=True)
    for name, expected in batch8_weights.items():
        torch.testing.assert_close(batched[name], expected, rtol=1e-4, atol=1e-5)


def test_training_with_batch_augmentation_pseudo_labels_and_every_loss_term_runs_on_the_cpu(plain_project, tmp_path):
    ingested = plain_project / Layout.ingested
    pseudo = load_samples(ingested, plain_project / Layout.splits, "train")[:4]  # their masks as pseudo masks
    (tmp_path / "pseudo_manifest.csv").write_text("image_id,image_path,mask_path\n" + "".join(
        f"{s.image_id},{s.image_path},{s.mask_path}\n" for s in pseudo))
    params = _plain_params(batch_size=8, batch_augment=True, crop_size=24, use_pseudo_labels=True,
                           augment={"hflip": True, "scale_min": 0.5, "scale_max": 1.5},
                           # every term on: Dice on the labeled images of mixed batches, OHEM in cross-entropy
                           loss={"dice": 0.5, "focal": 0.5, "lovasz": 0.5, "ohem_threshold": 0.7, "ohem_min_kept": 50})
    params.train.epochs = 3
    pseudo = pseudo * 3  # 12 pseudo-labeled images on top of the labeled ones: longer epochs, fewer of them
    (tmp_path / "pseudo_manifest.csv").write_text("image_id,image_path,mask_path\n" + "".join(
        f"{s.image_id}-{n},{s.image_path},{s.mask_path}\n" for n, s in enumerate(pseudo)))
    result = train_from_params(params, "unet_original", data_dir=ingested, splits_csv=plain_project / Layout.splits,
                   pseudo_dir=tmp_path, out_dir=tmp_path / "model")
    assert np.isfinite(result.history[0]["train_loss"])
    assert (tmp_path / "model/model.safetensors").exists()
    # Equal budget: the optimizer steps of labeled-only training, however many pseudo-labeled images come on top.
    labeled = load_samples(ingested, plain_project / Layout.splits, "train")
    assert result.steps == 3 * batches_per_rank(len(labeled), 8, 1)


def test_patience_stops_after_that_many_validations_without_a_better_val_miou(plain_project, tmp_path):
    # A learning rate too small to change a prediction: epoch 1 stays the best, epochs 2 and 3 use the patience.
    result = train_from_params(_plain_params(epochs=6, patience=2, lr=1e-12, batch_size=8), "unet_original",
                               data_dir=plain_project / Layout.ingested, splits_csv=plain_project / Layout.splits,
                               out_dir=tmp_path / "model")
    assert [record["epoch"] for record in result.history] == [1, 2, 3] and result.best_epoch == 1
    end = json.loads((tmp_path / "model/model.json").read_text())["extra"]["training_end"]
    assert end == {"epoch": 3, "max_epochs": 6, "reason": "patience", "patience": 2, "still_improving": False}


def test_val_interval_validates_and_checkpoints_every_nth_epoch_and_the_last(plain_project, tmp_path, monkeypatch):
    saved_after, save = [], Checkpointer.save

    def recording_save(self, progress, loss_sum):
        saved_after.append(progress.epoch - 1)  # progress already points at the next epoch
        save(self, progress, loss_sum)

    monkeypatch.setattr(Checkpointer, "save", recording_save)
    result = train_from_params(_plain_params(epochs=5, val_interval=2, batch_size=8), "unet_original",
                   data_dir=plain_project / Layout.ingested, splits_csv=plain_project / Layout.splits,
                   out_dir=tmp_path / "model")
    assert [record["epoch"] for record in result.history] == [1, 2, 3, 4, 5]  # every epoch's loss
    assert [record["epoch"] for record in result.history if "val_miou" in record] == [2, 4, 5]
    assert result.best_epoch in (2, 4, 5)
    assert saved_after == [2, 4, 5]


















def test_a_student_can_start_from_its_teachers_weights(plain_project, tmp_path):
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": plain_project / Layout.splits}
    train_from_params(_plain_params(batch_size=8), "unet_original", out_dir=tmp_path / "teacher", **data)
    # A learning rate too small to move the weights: what comes out is what went in.
    train_from_params(_plain_params(batch_size=8, lr=1e-12), "unet_original", out_dir=tmp_path / "student",
          init_from=tmp_path / "teacher", **data)
    teacher, student = weights(tmp_path / "teacher"), weights(tmp_path / "student")
    for name, expected in teacher.items():
        torch.testing.assert_close(student[name], expected, rtol=0, atol=1e-6)

    with pytest.raises(SegflowError, match="must be a model of the same architecture"):
        train_from_params(_plain_params(), "fcn8s", out_dir=tmp_path / "other", init_from=tmp_path / "teacher", **data)


def test_a_warm_start_from_a_model_of_other_classes_keeps_all_but_the_head_and_says_so(plain_project, tmp_path):
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": plain_project / Layout.splits}
    train_from_params(_plain_params(batch_size=8), "unet_original", out_dir=tmp_path / "old", **data)
    # The same images with one more class: the classifier has another number of outputs.
    more = plain_project / Layout.ingested.parent / f"more-classes-{tmp_path.name}"  # its image paths are relative
    shutil.copytree(plain_project / Layout.ingested, more)
    classes = json.loads((more / "classes.json").read_text())
    (more / "classes.json").write_text(json.dumps({**classes, "names": [*classes["names"], "extra"]}))
    params = _plain_params(batch_size=8, lr=1e-12, init_from=str(tmp_path / "old"))  # train.init_from
    train_from_params(params, "unet_original", out_dir=tmp_path / "new", data_dir=more, splits_csv=data["splits_csv"])
    old, new = weights(tmp_path / "old"), weights(tmp_path / "new")
    head = {"classifier.weight", "classifier.bias"}
    assert {k for k in old if old[k].shape != new[k].shape} == head
    for name in old.keys() - head:
        torch.testing.assert_close(new[name], old[name], rtol=0, atol=1e-6)
    card = json.loads((tmp_path / "new" / "model.json").read_text())
    assert card["extra"]["init_from"] == str(tmp_path / "old") and sorted(card["extra"]["reinitialised"]) == sorted(head)

    # Another width: nothing fits, and the error names the tensors and the options the model needs.
    wider = _plain_params(init_from=str(tmp_path / "old"))
    wider.models["unet_original"] = {**PLAIN_UNET, "width": 0.25}
    with pytest.raises(SegflowError, match=r"of another shape: classifier.weight, .* and more\); the options must be "
                                           r"the model's: \{'width': 0.125"):
        train_from_params(wider, "unet_original", out_dir=tmp_path / "wide", **data)
    assert not (tmp_path / "wide").exists()


def test_a_crop_larger_than_every_training_image_is_refused_before_it_eats_the_memory(plain_project, tmp_path):
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": plain_project / Layout.splits}
    # The images' side times train.augment.scale_max (every other test trains at exactly that crop).
    with pytest.raises(SegflowError, match=f"train.crop_size 4096 is larger .* Set train.crop_size to at most {SIZE}"):
        train_from_params(_plain_params(crop_size=4096), "unet_original", out_dir=tmp_path / "huge", **data)
    with pytest.raises(SegflowError, match=f"at most {SIZE * 2}"):
        train_from_params(_plain_params(crop_size=4096, augment={**NO_AUGMENT, "scale_max": 2.0}), "unet_original",
              out_dir=tmp_path / "huge", **data)
    assert not (tmp_path / "huge").exists()


def test_a_second_training_of_the_same_model_is_refused_and_leaves_the_first_alone(plain_project, tmp_path):
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": plain_project / Layout.splits}
    out_dir = tmp_path / "models" / "unet_original"
    lock = checkpoint.lock_path_for(out_dir)
    # Another process holds the lock as a training holds it, then is killed (its forked children live on).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from segflow.fsutil import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, 'the first training'):\n"
        "    if os.fork() == 0:\n"  # a child inheriting the descriptor, like a DataLoader worker
        "        time.sleep(30); os._exit(0)\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SegflowError, match=rf"a training of {out_dir} is already running \(pid {holder.pid} on"):
        train_from_params(_plain_params(), "unet_original", out_dir=out_dir, **data)
    assert not (tmp_path / "models" / ".unet_original.resume").exists()
    holder.kill()
    holder.wait()
    train_from_params(_plain_params(), "unet_original", out_dir=out_dir, **data)  # the lock went with its holder, not its child
    assert (out_dir / "model.safetensors").is_file()
    # the lock lives outside models/ (a dependency of the register stage): the folder holds the model alone
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["unet_original"] and lock.is_file()


@pytest.fixture(scope="module")
def splits_with_unlabeled(plain_project, tmp_path_factory):
    """plain_project's splits with a quarter of the train images turned unlabeled."""
    rows = (plain_project / Layout.splits).read_text().splitlines()
    train_rows = [i for i, row in enumerate(rows) if row.endswith(",train")]
    for i in train_rows[-4:]:
        rows[i] = rows[i].replace(",train", ",unlabeled")
    path = tmp_path_factory.mktemp("splits") / "splits.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("threshold, changes_training", [(1.0, False), (0.0, True)])
def test_consistency_on_unlabeled_images_adds_only_the_confident_pixels_loss(
    plain_project, splits_with_unlabeled, threshold, changes_training, tmp_path
):
    """Without batch norm the labeled images' outputs do not depend on the unlabeled crops beside them in the
    batch: when no pixel is confident enough the training is the labeled-only one (up to float summation
    order); when every pixel is, the unlabeled loss moves the weights."""
    data = {"data_dir": plain_project / Layout.ingested, "splits_csv": splits_with_unlabeled}
    params = {"batch_size": 4, "augment": {"hflip": True, "scale_min": 0.75, "scale_max": 1.25}, "crop_size": 24}
    train_from_params(_plain_params(**params), "unet_original", out_dir=tmp_path / "labeled", **data)
    result = train_from_params(_plain_params(**params, consistency={"weight": 1.0, "threshold": threshold, "cutmix": 0.5}),
                   "unet_original", out_dir=tmp_path / "consistency", **data)
    assert result.history[0]["unlabeled_confident"] == (1.0 if changes_training else 0.0)
    labeled, consistency = weights(tmp_path / "labeled"), weights(tmp_path / "consistency")
    largest_change = max((consistency[k] - labeled[k]).abs().max().item() for k in labeled)
    assert (largest_change > 1e-3) == changes_training, largest_change
    if not changes_training:
        assert largest_change < 1e-5


def test_a_val_split_without_labeled_pixels_is_refused_and_no_model_is_kept(tmp_path):
    project = make_project(tmp_path, train=2, val=2)
    for sample in load_samples(project / Layout.ingested, project / Layout.splits, "val"):
        write_mask(sample.mask_path, np.full((SIZE, SIZE), IGNORE_INDEX, np.uint8))
    out_dir = tmp_path / "model"

    with pytest.raises(SegflowError, match="val mIoU is undefined: the val split of .* has no labeled pixels"):
        train_from_params(_plain_params(batch_size=2, decoded_cache=False), "unet_original",
              data_dir=project / Layout.ingested, splits_csv=project / Layout.splits, out_dir=out_dir)
    assert not out_dir.exists() and not (tmp_path / ".model.resume").exists()
