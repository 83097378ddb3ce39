"""The team stack's servers refuse strangers: real `prefect server start` and `mlflow server` processes, plain HTTP.

The Prefect half replays the probe that found the stack open: with no credentials, create a flow, a deployment
on segflow-pool whose pull step is a shell script, and a flow run of it. Each request must be refused (401) and
leave nothing behind, while the same requests with the auth string succeed (so the test fails if auth is off).
"""

from __future__ import annotations

import configparser
from pathlib import Path

import httpx
import pytest

from stack_testing import ServerProcess, mlflow_server, prefect_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT_AUTH = "segflow:s3cret-for-the-test"
MLFLOW_ADMIN = ("segflow-admin", "admin-password-for-the-test")

# The probe's payloads: a pull step that runs whatever shell the caller sends, on the team's pool.
SHELL_PULL_STEP = {"prefect.deployments.steps.run_shell_script": {"script": "id > /tmp/pwned", "stream_output": True}}


def deployment_body(flow_id: str) -> dict:
    return {"name": "injected", "flow_id": flow_id, "work_pool_name": "segflow-pool", "pull_steps": [SHELL_PULL_STEP],
            "entrypoint": "flow.py:main"}


def running(server: ServerProcess):
    """Start ``server``, yield it once its /health answers (open to probes without credentials), then stop it."""
    try:
        server.start().wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """`prefect server start` with API auth on, as the compose stack's prefect-server."""
    root = tmp_path_factory.mktemp("prefect-auth")
    yield from running(prefect_server(root / "home", root / "prefect.log", auth_string=PREFECT_AUTH))


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory):
    """`mlflow server --app-name basic-auth` with the repo's basic_auth.ini (the user store moved here)."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')")
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read(ROOT / "infra/mlflow/basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    # Remember a checked password for a minute: each check costs seconds on a loaded CI machine; who may
    # do what is decided exactly as without the cache.
    ini["mlflow"]["auth_cache_ttl_seconds"] = "60"
    with open(root / "basic_auth.ini", "w") as out:
        ini.write(out)
    auth_env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
                "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_ADMIN[1],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-for-the-test"}
    yield from running(mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "mlflow.log",
                                     auth_env=auth_env))


def test_prefect_api_refuses_the_injection_without_credentials(prefect):
    user, _, password = PREFECT_AUTH.partition(":")
    with httpx.Client(base_url=prefect.url, timeout=30) as team, \
            httpx.Client(base_url=prefect.url, timeout=30) as stranger:
        team.auth = (user, password)

        # What the team can do, the stranger cannot: each step of the probe, with and without credentials.
        assert stranger.post("/work_pools/", json={"name": "segflow-pool", "type": "process"}).status_code == 401
        assert team.post("/work_pools/", json={"name": "segflow-pool", "type": "process"}).status_code == 201

        assert stranger.post("/flows/", json={"name": "injected"}).status_code == 401
        flow = team.post("/flows/", json={"name": "segflow-retraining"})
        assert flow.status_code == 201, flow.text
        flow_id = flow.json()["id"]

        assert stranger.post("/deployments/", json=deployment_body(flow_id)).status_code == 401
        deployment = team.post("/deployments/", json=deployment_body(flow_id))
        assert deployment.status_code == 201, deployment.text
        deployment_id = deployment.json()["id"]

        assert stranger.post(f"/deployments/{deployment_id}/create_flow_run", json={}).status_code == 401
        stranger.auth = (user, "wrong-password")
        assert stranger.post(f"/deployments/{deployment_id}/create_flow_run", json={}).status_code == 401
        stranger.auth = None
        assert stranger.post("/flow_runs/filter", json={}).status_code == 401, "reads need credentials too"

        # The refused requests left nothing behind: only the team's flow and deployment, and no flow run.
        assert [f["name"] for f in team.post("/flows/filter", json={}).json()] == ["segflow-retraining"]
        assert team.post("/deployments/count", json={}).json() == 1
        assert team.post("/flow_runs/count", json={}).json() == 0
        assert team.post(f"/deployments/{deployment_id}/create_flow_run", json={}).status_code == 201


def test_mlflow_refuses_anonymous_and_ungranted_users(mlflow):
    newcomer = ("newcomer", "newcomer-password-12")
    with httpx.Client(base_url=mlflow.url, timeout=30) as anonymous, \
            httpx.Client(base_url=mlflow.url, timeout=30, auth=MLFLOW_ADMIN) as admin, \
            httpx.Client(base_url=mlflow.url, timeout=30, auth=newcomer) as user:
        assert anonymous.get("/api/2.0/mlflow/experiments/search", params={"max_results": 10}).status_code == 401

        created = admin.post("/api/2.0/mlflow/experiments/create", json={"name": "team-experiment"})
        assert created.status_code == 200, created.text
        experiment = {"experiment_id": created.json()["experiment_id"]}
        assert admin.post("/api/2.0/mlflow/users/create",
                          json={"username": newcomer[0], "password": newcomer[1]}).status_code == 200

        assert admin.get("/api/2.0/mlflow/experiments/get", params=experiment).status_code == 200
        # default_permission = NO_PERMISSIONS: an account sees nothing it was not granted...
        ungranted = user.get("/api/2.0/mlflow/experiments/get", params=experiment)
        assert ungranted.status_code == 403, ungranted.text
        # ... and what it was, once granted (so the 403 is the permission, not a broken account).
        granted = admin.post("/api/3.0/mlflow/users/permissions/grant",
                             json={"username": newcomer[0], "resource_type": "experiment",
                                   "resource_id": experiment["experiment_id"], "permission": "READ"})
        assert granted.status_code == 200, granted.text
        assert user.get("/api/2.0/mlflow/experiments/get", params=experiment).status_code == 200
