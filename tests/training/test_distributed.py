"""Data-parallel training: the epoch's order dealt to the ranks, and two processes under torchrun train like
one process with the same global batch, unlabeled images' consistency loss included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segflow.config import Layout, parse_params
from segflow.training.distributed import EpochSampler
from train_testing import (
    NO_AUGMENT,
    PLAIN_UNET,
    SIZE,
    make_project,
    subprocess_env,
    train_from_params,
    weights,
    write_params,
)

ARCH = "unet_original"


def test_ranks_share_the_epoch_permutation_and_a_resumed_epoch_skips_what_was_trained():
    single = EpochSampler(10, seed=3)
    whole = [index for _, index in single]
    assert sorted(whole) == list(range(10)) and whole == [index for _, index in EpochSampler(10, seed=3)]
    single.set_epoch(2)
    assert [index for _, index in single] != whole  # a new order each epoch

    ranks = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    dealt = [list(sampler) for sampler in ranks]
    assert all(len(share) == len(sampler) == 4 for share, sampler in zip(dealt, ranks))  # 10 padded to 12
    by_position = sorted((seed, index) for share in dealt for seed, index in share)
    assert sorted(index for _, index in by_position) == sorted(whole + whole[:2])
    # A sample's seed (its augmentation) depends on its place in the epoch, not on the number of processes.
    assert {pair for share in dealt for pair in share} >= set(EpochSampler(10, seed=3))

    ranks[1].set_epoch(1, start=2)
    assert list(ranks[1]) == dealt[1][2:] and len(ranks[1]) == 2


def _params(batch_size: int) -> dict:
    return {
        "train": {"epochs": 1, "batch_size": batch_size, "crop_size": SIZE, "device": "cpu", "decoded_cache": False, "optimizer": "sgd",
                  "lr": 0.05, "use_pseudo_labels": False, "augment": NO_AUGMENT,
                  # Every pixel teaches; no CutMix, whose boxes pair crops within each process's batch.
                  "consistency": {"weight": 1.0, "threshold": 0.0, "cutmix": 0.0}},
        "models": {ARCH: PLAIN_UNET},
        "evaluate": {"batch_size": 2},
        "mlflow": {"experiment": "ddp-test"},
    }


def test_two_processes_under_torchrun_train_like_one_with_the_same_global_batch(tmp_path):
    root = make_project(tmp_path / "project", train=16)
    splits = (root / Layout.splits).read_text().splitlines()
    (root / Layout.splits).write_text("\n".join(row.replace(",train", ",unlabeled") if i > 12 else row
                                                for i, row in enumerate(splits)) + "\n")  # 12 train, 4 unlabeled
    write_params(root, _params(batch_size=4))
    segflow = Path(sys.executable).parent / "segflow"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         str(segflow), "train", "--arch", ARCH],
        cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    reference = train_from_params(parse_params(_params(batch_size=8)), ARCH, data_dir=root / Layout.ingested,
                      splits_csv=root / Layout.splits, out_dir=tmp_path / "reference")
    expected, actual = weights(tmp_path / "reference"), weights(root / Layout.models / ARCH)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-6)
    history = json.loads((root / Layout.models / ARCH / "history.json").read_text())
    # The loss averaged over both processes, the val confusion matrix summed over their shares of the images.
    assert history[0]["train_loss"] == pytest.approx(reference.history[0]["train_loss"], rel=1e-5)
    assert history[0]["val_pixel_accuracy"] == reference.history[0]["val_pixel_accuracy"]
    assert history[0]["unlabeled_confident"] == reference.history[0]["unlabeled_confident"] == 1.0
