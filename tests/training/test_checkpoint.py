"""Exact resume: a checkpoint restores every state, and a run SIGKILLed mid-epoch then resumed ends with the
same weights, bit for bit, as one never interrupted."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from segflow.cli import app
from segflow.config import Layout, parse_params
from segflow.data.imageio import read_mask
from segflow.errors import SegflowError
from segflow.training import checkpoint
from segflow.training.checkpoint import Checkpointer
from segflow.training.distributed import ProcessGroup
from segflow.training.plan import EpochPlan, Progress
from train_testing import make_project, segflow_command, subprocess_env, train_from_params, weights, write_params

ARCH = "unet_original"


def _training_state(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_checkpoint_restores_model_optimizer_scheduler_and_every_rng(tmp_path):
    model, optimizer, scheduler, scaler = _training_state()
    for _ in range(2):
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    random.gauss(0, 1)  # leaves a cached Gaussian in python's state, which must survive too
    progress = Progress(epoch=2, batches_done=3, best_miou=0.5, best_epoch=1, history=[{"epoch": 1}], run_id="r")
    checkpoint.save(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, progress=progress,
                    settings={"lr": 0.1}, tensors={f"rank0.{k}": v for k, v in checkpoint.rng_state().items()})
    expected_draws = _draws()
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = _training_state(lr=0.5)
    saved = checkpoint.load(tmp_path)
    checkpoint.restore(saved, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2], scaler=fresh[3])
    assert _draws() == expected_draws
    assert saved.progress == progress and saved.settings == {"lr": 0.1}
    assert all(torch.equal(fresh[0].state_dict()[k], v) for k, v in expected_state.items())
    assert fresh[1].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh[2].last_epoch == scheduler.last_epoch == 2
    momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(fresh[1].state[p]["momentum_buffer"], m) for p, m in zip(fresh[0].parameters(), momentum))
    # Only the JSON and one tensors file; no pickle anywhere.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "tensors-2-3.safetensors"]

    tensors = tmp_path / "tensors-2-3.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])  # the disk filled up, say
    with pytest.raises(SegflowError, match="unreadable checkpoint .* run without --resume to start over"):
        checkpoint.load(tmp_path)


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def _params(workers: int, **train: object) -> dict:
    return {
        "train": {"epochs": 2, "batch_size": 2, "crop_size": 32, "device": "cpu", "decoded_cache": False, "optimizer": "sgd", "lr": 0.05,
                  "checkpoint_every_steps": 1, "num_workers": workers, "use_pseudo_labels": False,
                  "ema": {"decay": 0.9}, **train},  # the Mean Teacher's weights are the ones kept: restored too
        # batch norm buffers and dropout draws (the global RNG) must come back exactly too
        "models": {ARCH: {"width": 0.125, "batch_norm": True, "dropout": 0.5}},
        "evaluate": {"batch_size": 2},
        "mlflow": {"experiment": "resume-test"},
    }


def _kill_mid_epoch(process: subprocess.Popen, state_file) -> dict:
    """Freeze the process once a checkpoint inside an epoch exists, then SIGKILL it; returns that checkpoint."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if state_file.exists():
            os.kill(process.pid, signal.SIGSTOP)
            saved = json.loads(state_file.read_text())
            if saved["progress"]["batches_done"] > 0:
                process.kill()
                process.wait()
                return saved
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.005)
    process.kill()
    raise AssertionError("no checkpoint within two minutes")


@pytest.fixture
def one_thread():
    """As in the subprocess (OMP_NUM_THREADS=1): float sums must be split over threads the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_killed_mid_epoch_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    root = make_project(tmp_path / "project", train=8, size=40)
    # Worker processes in the killed run, none in the resumed one and the reference: the data must not depend on them.
    write_params(root, _params(workers=2))
    out_dir = root / Layout.models / ARCH
    resume_dir = root / Layout.models / f".{ARCH}.resume"
    monkeypatch.chdir(root)
    cli = CliRunner()

    missing = cli.invoke(app, ["train", "--arch", ARCH, "--resume"])
    assert missing.exit_code != 0 and "no checkpoint to resume from" in str(missing.exception)

    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(segflow_command("train", "--arch", ARCH), cwd=root, env=subprocess_env(),
                               stdout=log, stderr=subprocess.STDOUT)
    saved = _kill_mid_epoch(process, resume_dir / "checkpoint.json")
    assert not out_dir.exists()

    write_params(root, _params(workers=0, lr=0.01))
    changed = cli.invoke(app, ["train", "--arch", ARCH, "--resume"])
    assert re.search(r"train\.lr: 0\.05 then, 0\.01 now", str(changed.exception))

    write_params(root, _params(workers=0))
    # A re-split or an edited mask (same manifest) is other data: refused naming it, then put back.
    mask = sorted((root / Layout.ingested / "masks").iterdir())[0]
    splits = (root / Layout.splits).read_text()
    for path, edited, named in [
        (root / Layout.splits, splits.replace(",val", ",test", 1).replace(",train", ",val", 1).encode(),
         r"data/splits.csv \(SHA-256\): '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"),
        (mask, _png_bytes(np.zeros_like(read_mask(mask))), rf"data/ingested: changed masks/{mask.name}"),
    ]:
        original = path.read_bytes()
        path.write_bytes(edited)
        refused = cli.invoke(app, ["train", "--arch", ARCH, "--resume"])
        assert refused.exit_code != 0 and re.search(named, str(refused.exception)), refused.exception
        path.write_bytes(original)
    resumed = cli.invoke(app, ["train", "--arch", ARCH, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not resume_dir.exists()

    reference = train_from_params(parse_params(_params(workers=0)), ARCH, data_dir=root / Layout.ingested,
                      splits_csv=root / Layout.splits, out_dir=tmp_path / "reference")
    expected, actual = weights(tmp_path / "reference"), weights(out_dir)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert json.loads((out_dir / "history.json").read_text()) == reference.history

    run = MlflowClient().get_run(saved["progress"]["run_id"])  # the killed run, continued and finished
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_miou")}) == [1, 2]


def test_checkpoints_fall_every_n_optimizer_steps_inside_epochs_and_after_validated_ones(tmp_path):
    # 3 epochs of 5 batches (3 in the last), 2 batches a step: steps end after batches 2, 4, 5 (2, 3 in the last).
    plan = EpochPlan(epochs=3, batches_per_epoch=5, last_epoch_batches=3, accumulate=2, val_interval=2)
    group = ProcessGroup(0, 1, torch.device("cpu"))
    after_steps = [(1, 2), (1, 4), (1, 5), (2, 2), (2, 4), (2, 5), (3, 2), (3, 3)]  # (epoch, batches done)
    every_2 = Checkpointer(tmp_path, group, {}, plan, every_steps=2)
    # Steps 2 and 4; 6 and 8 end an epoch, checkpointed (or not) with it.
    assert [at for at in after_steps if every_2.due(Progress(*at))] == [(1, 4), (2, 2)]
    assert not any(Checkpointer(tmp_path, group, {}, plan, every_steps=None).due(Progress(*at)) for at in after_steps)
    # An epoch ends at (next epoch, 0 batches done): checkpointed after the validated ones, 2 and the last.
    assert [epoch - 1 for epoch in (2, 3, 4) if every_2.due(Progress(epoch, 0))] == [2, 3]
