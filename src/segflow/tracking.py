"""MLflow set-up: the embedded default store, experiments, and one parent run per pipeline execution.

The orchestrator (``segflow pipeline`` or the Prefect flow) opens the parent run and exports its id in
``SEGFLOW_PARENT_RUN_ID``; every stage, a separate process under DVC, opens a nested run below it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow

from segflow.config import MlflowParams

PARENT_RUN_ENV = "SEGFLOW_PARENT_RUN_ID"


def tracking_uri(params: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` wins; then params; then a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(params: MlflowParams) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # A local store keeps artifacts next to the database; a server decides for itself.
        artifact_location = None
        if uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///"))
            artifact_location = (database.parent / params.artifact_root).resolve().as_uri()
        experiment_id = mlflow.create_experiment(params.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _run_tags(stage: str) -> dict[str, str]:
    tags = {"segflow.stage": stage}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


@contextlib.contextmanager
def stage_run(params: MlflowParams, stage: str, name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage (or one architecture), nested under the pipeline's parent run when there is one."""
    setup(params)
    tags = _run_tags(stage)
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=name or stage, tags=tags) as run:
        yield run


@contextlib.contextmanager
def pipeline_run(params: MlflowParams, name: str = "pipeline") -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline execution; exported to child processes through the environment."""
    setup(params)
    with mlflow.start_run(run_name=name, tags=_run_tags("pipeline")) as run:
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
