"""Scheduled retraining against real servers: Prefect (`prefect server start`), MLflow on PostgreSQL.

`segflow schedule --serve` registers the cron deployment and runs it; one triggered run pulls, retrains,
promotes and pushes while a second waits on the concurrency limit. Then the MLflow server is stopped and
`segflow register` must fail in one paragraph, registering nothing.

The triggered run is the session's one run of the whole pipeline (conftest.py: `scheduled_run`), whose outputs
test_training_pipeline.py checks.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from pipeline_testing import MODEL_NAME, SEGFLOW, candidate_arch, stack_env
from prefect.client.schemas.objects import ConcurrencyLimitStrategy, StateType

from segflow.config import Layout, load_params
from segflow.orchestration.schedule import schedule
from segflow.registry.tracking import SERVER_UNREACHABLE

pytestmark = pytest.mark.slow


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
    scheduled = schedule(params, project)  # in this process: the API URL is `prefect`'s
    assert scheduled.deployment == "segflow-retraining/on-pool" and scheduled.api_url == servers["prefect"].url

    deployment = prefect.read_deployment_by_name("segflow-retraining/on-pool")
    assert deployment.work_pool_name == "test-pool" and prefect.read_work_pool("test-pool").type == "process"
    assert deployment.entrypoint == "pipelines/retraining.py:segflow_retraining"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
    ]
    assert deployment.parameters == {}  # the stages read params.yaml (DVC's): the flow takes no parameters file
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert deployment.schedules[0].schedule.cron == "30 4 * * 2"


def test_second_run_waits_while_one_is_running(scheduled_run):
    assert scheduled_run["first_while_waiting"].is_running()
    assert scheduled_run["waiting"].type == StateType.SCHEDULED
    assert StateType.RUNNING not in scheduled_run["second_states"]


def test_scheduled_run_retrains_promotes_and_pushes(scheduled_run, project, servers):
    final = scheduled_run["final"]
    assert final.is_completed(), final.message
    decision = json.loads((project / Layout.registry).read_text())
    # The chosen candidate's architecture: pspnet, or the teacher's (unet).
    assert decision["promoted"] is True and decision["arch"] == candidate_arch(decision["candidate"])
    client = MlflowClient(tracking_uri=servers["mlflow"].url, registry_uri=servers["mlflow"].url)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == decision["version"]
    assert champion.source.startswith(("models:/", "mlflow-artifacts:/"))  # stored through the server
    # Everything the run produced is in the DVC remote.
    in_sync = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "--json"], cwd=project,
                             capture_output=True, text=True, check=True)
    assert json.loads(in_sync.stdout) == {}


def test_register_fails_clearly_while_the_mlflow_server_is_down(scheduled_run, project, servers, tmp_path):
    mlflow = servers["mlflow"]
    client = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
    versions_before = {v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    decision_before = (project / Layout.registry).read_text()
    # Few, short retries: MLflow's defaults retry for minutes before giving up.
    env = stack_env(servers, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    mlflow.stop()
    try:
        result = subprocess.run([SEGFLOW, "register"], cwd=project, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        mlflow.start()
    assert result.returncode == 4, result.stderr
    assert f"segflow: error: {SERVER_UNREACHABLE} at {mlflow.url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert (project / Layout.registry).read_text() == decision_before

    mlflow.wait()
    assert {v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")} == versions_before
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == json.loads(decision_before)["version"]
