"""Shared fixtures: isolated MLflow/Prefect homes, small torch thread count, tiny generated data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# `make test` runs two pytest-xdist workers on the two cores: one thread each, and an ephemeral Prefect server
# each, with its own database.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"segflow-prefect-{worker}-")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Session fixtures of tests/pipelines/conftest.py: the team stack's servers and the one scheduled pipeline run.
# Their tests share a worker, so that each is started once.
STACK_FIXTURES = {"postgres", "prefect_server_process", "servers", "prefect_api", "prefect", "project",
                  "served_deployment", "scheduled_run"}


# pytest-xdist's loadgroup reads the mark in its own collection hook, so this one runs first; and pytest 9.2.0
# splits a group over the workers even so (pytest is pinned to 9.1.1).
# The slow tests first (the stack's group, the whole-pipeline runs): each worker starts on a long one and fills in
# with the short ones, instead of meeting a long one last while the other worker idles.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("stack"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the order otherwise kept


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """One embedded MLflow store for the session, so no test writes to the project's mlflow.db."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("SEGFLOW_PARENT_RUN_ID", None)
    return uri


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A trained-looking model folder, one tiny labeled test image, and its splits file (register tests)."""
    from register_testing import make_workspace

    return make_workspace(tmp_path)
