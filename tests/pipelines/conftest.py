"""Servers for the pipeline tests: PostgreSQL, an MLflow server on it and a Prefect server, started once; and
the one run of the whole pipeline in a session, shared by the end-to-end and the scheduled-retraining tests.

The pipeline runs once, as a triggered run of the served cron deployment (``segflow schedule --serve``) on the
servers: test_scheduled_retraining.py checks how it was orchestrated, test_training_pipeline.py what it produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pipeline_testing import DEPLOYMENT, PIPELINE, SEGFLOW, dvc, make_project, stack_env, wait_for
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled

from segflow.config import Layout
from stack_testing import Postgres, ServerProcess, mlflow_server, prefect_server


@pytest.fixture(scope="session")
def postgres(project_root):
    """Debian's PostgreSQL on 127.0.0.1, set up by the compose stack's infra/postgres/init.sql."""
    server = Postgres()
    try:
        yield server.start(init_sql=(project_root / "infra/postgres/init.sql").read_text())
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_server_process(tmp_path_factory) -> ServerProcess:
    """`prefect server start`, started and not waited for (see `servers`, `prefect_api`)."""
    root = tmp_path_factory.mktemp("prefect-server")
    server = prefect_server(root / "prefect-home", root / "prefect.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def servers(prefect_server_process, postgres, tmp_path_factory) -> dict[str, ServerProcess]:
    """An MLflow server (metadata in PostgreSQL, artifacts proxied to a folder) and the Prefect server.

    They start together (the Prefect server even before PostgreSQL): each takes tens of seconds on two cores.
    """
    root = tmp_path_factory.mktemp("servers")
    started = {
        "prefect": prefect_server_process,
        "mlflow": mlflow_server(postgres.url("mlflow"), root / "mlflow-artifacts", root / "mlflow.log").start(),
    }
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        started["mlflow"].stop()


@pytest.fixture(scope="session")
def prefect_api(prefect_server_process, tmp_path_factory) -> str:
    """The Prefect server as this process's Prefect API, for the rest of the session: flows called here run
    against it (as under prefect_test_harness, without starting a second server)."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    prefect_server_process.wait()
    with temporary_settings({PREFECT_API_URL: prefect_server_process.url}):
        yield prefect_server_process.url


@pytest.fixture(scope="session")
def prefect(prefect_api):
    """A client of the Prefect server."""
    with get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="session")
def project(tmp_path_factory, project_root) -> Path:
    """The project of the session's pipeline run: PIPELINE's parameters, a DVC remote to pull from and push to."""
    root = make_project(tmp_path_factory.mktemp("project"), project_root, PIPELINE)
    dvc(root, "remote", "add", "-d", "team", str(tmp_path_factory.mktemp("dvc-remote")))
    return root


def _deployment(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


@pytest.fixture(scope="session")
def served_deployment(project, servers, prefect, tmp_path_factory):
    """`segflow schedule --serve` running in the project folder; the deployment it registered."""
    home = tmp_path_factory.mktemp("serve-home")
    env = stack_env(servers, home, PREFECT_RUNNER_POLL_FREQUENCY="1")
    serving = ServerProcess([SEGFLOW, "schedule", "--serve"], env, home / "serve.log", cwd=project).start()
    try:
        yield wait_for(lambda: _deployment(prefect, DEPLOYMENT), 120, f"{DEPLOYMENT} on the Prefect server")
    finally:
        serving.stop()


def _state(client, flow_run_id):
    return client.read_flow_run(flow_run_id).state


@pytest.fixture(scope="session")
def scheduled_run(served_deployment, prefect, project) -> dict:
    """One run of the deployment to its end, and a second one triggered while it ran (then cancelled).

    The first is the session's run of the whole pipeline; "decision" is the registry decision it left, what the
    flow returns (None when it left none).
    """
    first = prefect.create_flow_run_from_deployment(served_deployment.id)
    wait_for(lambda: _state(prefect, first.id).is_running(), 120, "the first run to start")
    second = prefect.create_flow_run_from_deployment(served_deployment.id)
    waiting = wait_for(lambda: (s := _state(prefect, second.id)).name == "AwaitingConcurrencySlot" and s, 60,
                       "the second run to wait for the concurrency slot")
    first_while_waiting = _state(prefect, first.id)
    prefect.set_flow_run_state(second.id, Cancelled(), force=True)
    # The whole pipeline (TINY) takes two to three minutes on two idle cores.
    final = wait_for(lambda: (s := _state(prefect, first.id)).is_final() and s, 900, "the first run to finish")
    second_states = [s.type for s in prefect.read_flow_run_states(second.id)]
    registry = project / Layout.registry
    decision = json.loads(registry.read_text()) if registry.exists() else None
    return {"final": final, "waiting": waiting, "first_while_waiting": first_while_waiting,
            "second_states": second_states, "decision": decision}
