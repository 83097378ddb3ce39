"""Scheduled retraining against real servers: Prefect (`prefect server start`), MLflow on PostgreSQL.

`segflow schedule --serve` registers the cron deployment and runs it; one triggered run pulls, retrains,
promotes and pushes while a second waits on the concurrency limit. Then the MLflow server is stopped and
`segflow register` must fail in one paragraph, registering nothing.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_testing import TINY, dvc, make_project, merge
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled

from segflow.config import Layout, load_params
from segflow.schedule import schedule
from segflow.tracking import SERVER_UNREACHABLE
from stack_testing import VENV_BIN, ServerProcess

SEGFLOW = str(VENV_BIN / "segflow")
SCHEDULED = {  # smaller still than TINY: this run is about orchestration, not about the models
    "synth": {"num_labeled": 20, "num_unlabeled": 4, "image_size": 48},
    "train": {"archs": ["unet"], "epochs": 1, "crop_size": 48},  # one architecture: enough to register and promote
    "teacher": {"epochs": 1, "snapshots": 0},
    "evaluate": {"num_overlays": 1},
    "register": {"model_name": "segflow-scheduled"},
    "schedule": {"cron": "30 4 * * 2", "timezone": "Europe/Berlin", "concurrency_limit": 1},
}
DEPLOYMENT = "segflow-retraining/scheduled"

pytestmark = pytest.mark.slow


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stack_env(servers, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_API_URL=servers["prefect"].url, MLFLOW_TRACKING_URI=servers["mlflow"].url,
               PREFECT_HOME=str(prefect_home), **extra)
    env.pop("SEGFLOW_PARENT_RUN_ID", None)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory, project_root) -> Path:
    root = make_project(tmp_path_factory.mktemp("scheduled"), project_root, merge(copy.deepcopy(TINY), SCHEDULED))
    dvc(root, "remote", "add", "-d", "team", str(tmp_path_factory.mktemp("dvc-remote")))
    return root


@pytest.fixture(scope="module")
def prefect(servers):
    with temporary_settings({PREFECT_API_URL: servers["prefect"].url}), get_client(sync_client=True) as client:
        yield client


def _deployment(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


@pytest.fixture(scope="module")
def served_deployment(project, servers, prefect, tmp_path_factory):
    """`segflow schedule --serve` running in the project folder; the deployment it registered."""
    home = tmp_path_factory.mktemp("serve-home")
    env = stack_env(servers, home, PREFECT_RUNNER_POLL_FREQUENCY="1")
    serving = ServerProcess([SEGFLOW, "schedule", "--serve"], env, home / "serve.log", cwd=project).start()
    try:
        yield wait_for(lambda: _deployment(prefect, DEPLOYMENT), 120, f"{DEPLOYMENT} on the Prefect server")
    finally:
        serving.stop()


def test_served_deployment_has_the_cron_and_concurrency_limit_of_params(served_deployment):
    (cron,) = served_deployment.schedules
    assert cron.active
    assert (cron.schedule.cron, cron.schedule.timezone) == ("30 4 * * 2", "Europe/Berlin")
    assert served_deployment.global_concurrency_limit.limit == 1
    assert served_deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert served_deployment.work_pool_name is None


def test_schedule_without_serve_puts_the_deployment_on_a_work_pool(project, servers, prefect):
    params = load_params(project / "params.yaml")
    params.schedule = params.schedule.model_copy(
        update={"deployment": "on-pool", "work_pool": "test-pool", "on_overlap": "cancel_new"})
    scheduled = schedule(params, project, "params-pool.yaml")  # in this process: the API URL is `prefect`'s
    assert scheduled.deployment == "segflow-retraining/on-pool" and scheduled.api_url == servers["prefect"].url

    deployment = prefect.read_deployment_by_name("segflow-retraining/on-pool")
    assert deployment.work_pool_name == "test-pool" and prefect.read_work_pool("test-pool").type == "process"
    assert deployment.entrypoint == "pipelines/retraining.py:segflow_retraining"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
    ]
    assert deployment.parameters == {"params_file": "params-pool.yaml"}
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert deployment.schedules[0].schedule.cron == "30 4 * * 2"


def _state(client, flow_run_id):
    return client.read_flow_run(flow_run_id).state


@pytest.fixture(scope="module")
def scheduled_run(served_deployment, prefect):
    """One run of the deployment to its end, and a second one triggered while it ran (then cancelled)."""
    first = prefect.create_flow_run_from_deployment(served_deployment.id)
    wait_for(lambda: _state(prefect, first.id).is_running(), 120, "the first run to start")
    second = prefect.create_flow_run_from_deployment(served_deployment.id)
    waiting = wait_for(lambda: (s := _state(prefect, second.id)).name == "AwaitingConcurrencySlot" and s, 60,
                       "the second run to wait for the concurrency slot")
    first_while_waiting = _state(prefect, first.id)
    prefect.set_flow_run_state(second.id, Cancelled(), force=True)
    final = wait_for(lambda: (s := _state(prefect, first.id)).is_final() and s, 400, "the first run to finish")
    second_states = [s.type for s in prefect.read_flow_run_states(second.id)]
    return {"final": final, "waiting": waiting, "first_while_waiting": first_while_waiting,
            "second_states": second_states}


def test_second_run_waits_while_one_is_running(scheduled_run):
    assert scheduled_run["first_while_waiting"].is_running()
    assert scheduled_run["waiting"].type == StateType.SCHEDULED
    assert StateType.RUNNING not in scheduled_run["second_states"]


def test_scheduled_run_retrains_promotes_and_pushes(scheduled_run, project, servers):
    final = scheduled_run["final"]
    assert final.is_completed(), final.message
    decision = json.loads((project / Layout.registry).read_text())
    assert decision["promoted"] is True and decision["arch"] == "unet"
    client = MlflowClient(tracking_uri=servers["mlflow"].url, registry_uri=servers["mlflow"].url)
    champion = client.get_model_version_by_alias("segflow-scheduled", "champion")
    assert str(champion.version) == decision["version"]
    assert champion.source.startswith(("models:/", "mlflow-artifacts:/"))  # stored through the server
    # Everything the run produced is in the DVC remote.
    in_sync = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "--json"], cwd=project,
                             capture_output=True, text=True, check=True)
    assert json.loads(in_sync.stdout) == {}


def test_register_fails_clearly_while_the_mlflow_server_is_down(scheduled_run, project, servers, tmp_path):
    mlflow = servers["mlflow"]
    client = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
    versions_before = {v.version for v in client.search_model_versions("name='segflow-scheduled'")}
    decision_before = (project / Layout.registry).read_text()
    # Few, short retries: MLflow's defaults retry for minutes before giving up.
    env = stack_env(servers, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    mlflow.stop()
    try:
        result = subprocess.run([SEGFLOW, "register"], cwd=project, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        mlflow.start()
    assert result.returncode == 2, result.stderr
    assert f"segflow: error: {SERVER_UNREACHABLE} at {mlflow.url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert (project / Layout.registry).read_text() == decision_before

    mlflow.wait()
    assert {v.version for v in client.search_model_versions("name='segflow-scheduled'")} == versions_before
    champion = client.get_model_version_by_alias("segflow-scheduled", "champion")
    assert str(champion.version) == json.loads(decision_before)["version"]
