"""Shared fixtures: isolated MLflow/Prefect homes, small torch thread count, tiny generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
