"""Servers for the pipeline tests: PostgreSQL, an MLflow server on it and a Prefect server, started once."""

from __future__ import annotations

import pytest

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
def servers(postgres, tmp_path_factory) -> dict[str, ServerProcess]:
    """An MLflow server (metadata in PostgreSQL, artifacts proxied to a folder) and a Prefect server.

    Both start together: each takes tens of seconds on two cores.
    """
    root = tmp_path_factory.mktemp("servers")
    started = {
        "prefect": prefect_server(root / "prefect-home", root / "prefect.log").start(),
        "mlflow": mlflow_server(postgres.url("mlflow"), root / "mlflow-artifacts", root / "mlflow.log").start(),
    }
    try:
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()
