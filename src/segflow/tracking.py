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
import requests
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException

from segflow.config import MlflowParams
from segflow.errors import SegflowError

PARENT_RUN_ENV = "SEGFLOW_PARENT_RUN_ID"


def tracking_uri(params: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` wins; then params; then a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(params: MlflowParams) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    # Synchronous logging: a call returns once the server holds the data, waiting through a server restart
    # (see stage_run). MLflow's async queue only logs a batch it failed to send, and the metric is lost.
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
def stage_run(
    params: MlflowParams, stage: str, name: str | None = None, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage (or one architecture), nested under the pipeline's parent run when there is one;
    with ``run_id``, that earlier run continues (a resumed training).

    A tracking server that goes away inside is waited for: MLflow retries each request with back-off
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``..._BACKOFF_FACTOR``: about four minutes by default), so a
    logging call made during a restart returns, nothing lost, once the server is back. A longer outage fails
    the stage with :func:`unreachable_server_error`.
    """
    setup(params)
    nested = mlflow.active_run() is not None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        tags = _run_tags(stage)
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        run = mlflow.start_run(run_name=name or stage, tags=tags, nested=nested)
    with run:
        try:
            yield run
        except Exception as exc:
            if (error := unreachable_server_error(exc)) is None:
                raise
            # Marking the run failed needs the server too: one try, not a second round of retries (while the
            # server is still down the run stays RUNNING in the store; a resumed training reopens it anyway).
            with _single_request_attempt(), contextlib.suppress(MlflowException):
                mlflow.end_run("FAILED")
            raise error from exc


@contextlib.contextmanager
def _single_request_attempt() -> Iterator[None]:
    previous = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get_raw()
    MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(0)
    try:
        yield
    finally:
        if previous is None:
            MLFLOW_HTTP_REQUEST_MAX_RETRIES.unset()
        else:
            MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(previous)


@contextlib.contextmanager
def pipeline_run(params: MlflowParams, name: str = "pipeline") -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline execution; exported to child processes through the environment."""
    setup(params)
    with mlflow.start_run(run_name=name, tags=_run_tags("pipeline")) as run, runs_nested_under(run.info.run_id):
        yield run


@contextlib.contextmanager
def runs_nested_under(run_id: str) -> Iterator[None]:
    """Stage runs opened inside (in this process or its children) become children of ``run_id``."""
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


# The Prefect flow retries a stage whose error says this (a server outage passes), unlike other errors.
SERVER_UNREACHABLE = "the MLflow tracking server cannot be reached"
_UNREACHABLE_CAUSES = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                       requests.exceptions.RetryError)


def unreachable_server_error(exc: BaseException) -> SegflowError | None:
    """A one-paragraph error when ``exc`` comes from an MLflow server that is down, hung or failing, else None.

    MLflow wraps the ``requests`` error in an ``MlflowException`` (as its context, not its cause), so the
    whole chain is searched.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, _UNREACHABLE_CAUSES):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    return SegflowError(
        f"{SERVER_UNREACHABLE} at {mlflow.get_tracking_uri()} ({type(cause).__name__}: {cause}). Start it, or "
        "point MLFLOW_TRACKING_URI at a running one, and run the stage again (a stage writes its outputs, and "
        "register moves the champion alias, only when it completes); `segflow train --arch NAME --resume` "
        "continues an interrupted training from its last checkpoint, in the same MLflow run."
    )
