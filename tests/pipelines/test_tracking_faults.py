"""Faults of the tracking server, against the real `mlflow server` on PostgreSQL of the team stack.

* The server is stopped in the middle of two trainings and restarted: one training, with MLflow's default
  HTTP retries, waits for it and continues; the other, allowed no retry, fails in one paragraph and
  `--resume` finishes it. Both end with the same weights and every epoch's metrics in the store.
* A register cut short after creating its model version leaves the version with all its tags, and the next
  register finishes that version instead of adding another.
* Two promotions at once, and a version whose files were deleted from the artifact store, as in
  tests/test_registry_ops.py but on the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pipeline_testing import mlflow_at

from promotion_testing import check_concurrent_promotions, check_deleted_model_files_are_refused
from register_testing import register_version
from segflow.config import Layout
from segflow.errors import SegflowError
from segflow.registry.mlflow_registry import CHALLENGER, CHAMPION, champion_history
from segflow.registry.tracking import SERVER_UNREACHABLE
from segflow.stages.register import WEIGHTS_TAG
from train_testing import make_project, segflow_command, subprocess_env, weights, write_params

pytestmark = pytest.mark.slow

ARCH = "unet_original"
EPOCHS = 3


def _train_params(experiment: str) -> dict:
    return {
        "train": {"epochs": EPOCHS, "batch_size": 4, "crop_size": 32, "device": "cpu", "decoded_cache": False, "optimizer": "sgd",
                  "lr": 0.05, "num_workers": 0, "use_pseudo_labels": False},
        "models": {ARCH: {"width": 0.125, "batch_norm": True, "dropout": 0.0}},
        "evaluate": {"batch_size": 4},
        "mlflow": {"experiment": experiment},
    }


def _freeze_after_first_epoch(trainings: dict[Path, subprocess.Popen]) -> list[str]:
    """SIGSTOP each training (project: process) as soon as its epoch 1 is checkpointed, hence its metrics are in
    the store; returns their run ids."""
    run_ids: dict[Path, str] = {}
    deadline = time.monotonic() + 180
    while len(run_ids) < len(trainings):
        assert time.monotonic() < deadline, "no checkpoint of epoch 1 within three minutes"
        for project, process in trainings.items():
            state_file = project / Layout.models / f".{ARCH}.resume" / "checkpoint.json"
            if project not in run_ids and state_file.exists():
                os.kill(process.pid, signal.SIGSTOP)
                run_ids[project] = json.loads(state_file.read_text())["progress"]["run_id"]
            assert process.poll() is None, "a training ended before the server was stopped"
        time.sleep(0.005)
    return [run_ids[project] for project in trainings]


def test_trainings_survive_a_restart_of_the_tracking_server(servers, tmp_path):
    mlflow_server = servers["mlflow"]
    waiting = make_project(tmp_path / "waiting", train=8)
    failing = tmp_path / "failing"
    shutil.copytree(waiting, failing)
    write_params(waiting, _train_params("fault-waiting"))
    write_params(failing, _train_params("fault-failing"))
    env = {**subprocess_env(), "MLFLOW_TRACKING_URI": mlflow_server.url}
    env.pop("SEGFLOW_PARENT_RUN_ID", None)
    no_retry_env = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    logs = {name: tmp_path / f"{name}.log" for name in ("waiting", "failing", "resumed")}

    def start(project: Path, log: Path, environment: dict[str, str], *extra: str) -> subprocess.Popen:
        return subprocess.Popen(segflow_command("train", "--arch", ARCH, *extra), cwd=project, env=environment,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)

    trainings = [start(waiting, logs["waiting"], env), start(failing, logs["failing"], no_retry_env)]
    processes = list(trainings)
    try:
        run_ids = _freeze_after_first_epoch(dict(zip((waiting, failing), trainings)))
        mlflow_server.stop()
        for process in trainings:
            os.kill(process.pid, signal.SIGCONT)
        assert trainings[1].wait(timeout=120) == 4, logs["failing"].read_text()
        # Resumed while the server is still starting: with MLflow's default retries it waits for it.
        mlflow_server.start()
        processes.append(resumed := start(failing, logs["resumed"], env, "--resume"))
        assert resumed.wait(timeout=300) == 0, logs["resumed"].read_text()
        assert trainings[0].wait(timeout=300) == 0, logs["waiting"].read_text()
        mlflow_server.wait()
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
        if mlflow_server.process.poll() is not None:
            mlflow_server.start()
        mlflow_server.wait()  # the other tests of the session need it

    failure = logs["failing"].read_text()
    assert f"segflow: error: {SERVER_UNREACHABLE} at {mlflow_server.url}" in failure
    assert "segflow train --arch NAME --resume" in failure and "Traceback" not in failure
    # The waiting training met the outage: urllib3 warns at each retry of a refused connection.
    assert "Retrying" in logs["waiting"].read_text()

    # The resumed training ends exactly where the one that waited does.
    expected, actual = weights(waiting / Layout.models / ARCH), weights(failing / Layout.models / ARCH)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    history = json.loads((waiting / Layout.models / ARCH / "history.json").read_text())
    assert json.loads((failing / Layout.models / ARCH / "history.json").read_text()) == history

    client = MlflowClient(tracking_uri=mlflow_server.url)
    for run_id, experiment in zip(run_ids, ("fault-waiting", "fault-failing")):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.run_id == run_id and run.info.status == "FINISHED"  # one run, continued after the fault
        logged = client.get_metric_history(run_id, "val_miou")
        assert sorted((m.step, m.value) for m in logged) == [(h["epoch"], pytest.approx(h["val_miou"])) for h in history]
        assert "best_val_miou" in run.data.metrics
        assert "checkpoint/model.safetensors" in {f.path for f in client.list_artifacts(run_id, "checkpoint")}


@pytest.fixture
def on_the_server(servers):
    """The tracking and registry URIs on the MLflow server for one test (segflow and the promotion workers too)."""
    with mlflow_at(servers["mlflow"].url):
        yield servers["mlflow"]


def test_a_register_cut_short_after_creating_its_version_is_finished_by_the_next(workspace, on_the_server,
                                                                              monkeypatch):
    register_version(workspace, "cut-short", 0.5)
    set_alias = MlflowClient.set_registered_model_alias

    def server_gone_once(self, *args):
        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
        raise MlflowException("API request failed") from requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", server_gone_once)
    with pytest.raises(SegflowError, match=SERVER_UNREACHABLE):
        register_version(workspace, "cut-short", 0.7)
    client = MlflowClient()
    created = client.get_model_version("cut-short", "2")
    assert {"arch", "test_miou", "test_data_hash", WEIGHTS_TAG, "source_run_id"} <= created.tags.keys()
    assert created.tags["test_miou"] == "0.7" and not created.aliases  # complete, but neither gated nor challenger
    assert client.get_registered_model("cut-short").aliases == {CHAMPION: "1", CHALLENGER: "1"}

    decision = register_version(workspace, "cut-short", 0.7)
    assert (decision.version, decision.promoted) == ("2", True)
    assert sorted(v.version for v in client.search_model_versions("name = 'cut-short'")) == ["1", "2"]
    assert client.get_registered_model("cut-short").aliases == {CHAMPION: "2", CHALLENGER: "2"}
    assert [h["version"] for h in champion_history(client, "cut-short")] == ["1", "2"]


def test_concurrent_promotions_on_the_server(workspace, on_the_server):
    check_concurrent_promotions(workspace, "server-race")


def test_deleted_model_files_on_the_server_are_refused(workspace, on_the_server):
    check_deleted_model_files_are_refused(workspace, "server-gone")
