"""MLflow set-up: the embedded default store, experiments, and one parent run per pipeline execution.

The orchestrator (``segflow pipeline`` or the Prefect flow) opens the parent run and exports its id in
``SEGFLOW_PARENT_RUN_ID``; every stage, a separate process under DVC, opens a nested run below it. A plain
``dvc repro`` has no orchestrator: its stages share a parent keyed by the ``dvc`` process that runs them
(:func:`dvc_repro`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pandas as pd
import psutil
import requests
from mlflow import MlflowClient
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from segflow.config import MlflowParams
from segflow.data.fingerprint import file_sha256
from segflow.errors import ServiceUnavailable, in_chain

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "SEGFLOW_PARENT_RUN_ID"
# A classic ML experiment, not a GenAI one, for MLflow's UI and tools (3.17's UI still starts on its GenAI view
# until its "Model training" switch is set, or the address says workflowType=machine_learning: see run_page).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DVC_STAGE = "DVC_STAGE"  # set by DVC in each stage command's environment
REPRO_TAG = "segflow.dvc_repro"  # on the parent run of a plain `dvc repro`: which one (see dvc_repro)
# In a model card's ``extra``: the MLflow run that trained the model; its evaluation and its registered version
# are logged there too.
TRAINING_RUN_KEY = "mlflow_run_id"


def tracking_uri(mlflow_cfg: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` wins; then params; then a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow_cfg.tracking_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(mlflow_cfg: MlflowParams) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    # Synchronous logging: a call returns once the server holds the data, waiting through a server restart
    # (see stage_run). MLflow's async queue only logs a batch it failed to send, and the metric is lost.
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    uri = tracking_uri(mlflow_cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(mlflow_cfg.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # A local store keeps artifacts next to the database; a server decides for itself.
        artifact_location = None
        if uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///"))
            artifact_location = (database.parent / mlflow_cfg.artifact_root).resolve().as_uri()
        experiment_id = mlflow.create_experiment(mlflow_cfg.experiment, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if experiment is not None and EXPERIMENT_KIND_TAG not in experiment.tags:  # created by MLflow or an older segflow
        MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
    mlflow_cfg: MlflowParams, stage: str, name: str | None = None, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run for one stage (or one architecture), nested under the pipeline's parent run when there is one;
    with ``run_id``, that earlier run continues (a resumed training).

    A tracking server that goes away inside is waited for: MLflow retries each request with back-off
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``..._BACKOFF_FACTOR``: about four minutes by default), so a
    logging call made during a restart returns, nothing lost, once the server is back. A longer outage fails
    the stage with :func:`unreachable_server_error`.
    """
    experiment_id = setup(mlflow_cfg)
    nested = mlflow.active_run() is not None
    repro_parent = None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        tags = _run_tags(stage)
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent is None and (repro := dvc_repro()) is not None:
            parent = repro_parent = repro_parent_run(experiment_id, repro)
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        run = mlflow.start_run(run_name=name or stage, tags=tags, nested=nested)
    ended = "FAILED"
    try:
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
                repro_parent = None  # nor is its parent's end recorded
                raise error from exc
        ended = "FINISHED"
    finally:
        if repro_parent is not None:  # the repro's latest stage tells how it ended, and when
            MlflowClient().set_terminated(repro_parent, ended)


def dvc_repro() -> str | None:
    """The ``dvc repro`` (or ``dvc exp run``) running this process as a stage, as ``host:pid:start time`` (unique
    on a machine, and the same for each of its stages); None when not run by DVC, or when it cannot be told.

    DVC sets ``DVC_STAGE`` in each stage command's environment, not in its own: it is the nearest ancestor
    without it (the stage's shell has it)."""
    if DVC_STAGE not in os.environ:
        return None
    try:
        for process in psutil.Process().parents():
            if DVC_STAGE not in process.environ():
                return f"{socket.gethostname()}:{process.pid}:{process.create_time():.2f}"
    except psutil.Error as exc:  # another user's process, or a platform that hides environments
        log.warning("the dvc process running this stage cannot be identified (%s): its run has no parent", exc)
    return None


def repro_parent_run(experiment_id: str, repro: str) -> str:
    """The parent run of the ``dvc repro`` identified by ``repro``: created by its first stage that logs to
    MLflow, found by the next ones (DVC runs a repro's stages one at a time)."""
    client = MlflowClient()
    found = client.search_runs([experiment_id], f"tags.`{REPRO_TAG}` = '{repro}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, "RUNNING")
        return found[0].info.run_id
    tags = resolve_tags({**_run_tags("pipeline"), REPRO_TAG: repro})  # with the user and source, as start_run's
    run = client.create_run(experiment_id, run_name="dvc repro", tags=tags)
    return run.info.run_id


def run_page(run: mlflow.ActiveRun) -> str:
    """Where a person sees ``run``: its page on the tracking server, or how to open it from a local store. The
    page opens in the UI's "Model training" view: MLflow 3's UI starts on its GenAI view otherwise, whatever the
    experiment's kind."""
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    uri = mlflow.get_tracking_uri()
    server = urlsplit(uri)
    if server.scheme in ("http", "https"):  # the address without any credentials in it: this goes to logs
        return f"{server.scheme}://{server.netloc.rpartition('@')[2]}{server.path.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def parent_run_id(run: mlflow.ActiveRun) -> str | None:
    """The pipeline run ``run`` is nested under, if any."""
    return run.data.tags.get(MLFLOW_PARENT_RUN_ID)


def training_run(card_extra: dict) -> str | None:
    """The run that trained a model, from its card's ``extra``, when this store holds it; None for a model
    trained before segflow recorded it, or against another tracking store."""
    run_id = card_extra.get(TRAINING_RUN_KEY)
    if run_id is None:
        return None
    try:
        active = MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        active = False
    if not active:
        log.warning("the training run %s of this model is not in %s (or was deleted): its evaluation and "
                    "registration are logged in their own runs only", run_id, mlflow.get_tracking_uri())
        return None
    return run_id


def log_dataset(data_dir: Path, splits_csv: Path, classes: list[str]) -> None:
    """Log the images a training used as the active run's input (MLflow's dataset API): one row per image of
    ``splits_csv`` with its split, tagged with the manifest's SHA-256, the class names and the split sizes."""
    table = pd.read_csv(splits_csv, dtype=str)
    sizes = table["split"].value_counts()
    with warnings.catch_warnings():  # MLflow registers its local source type twice, then warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(table, source=str(Path(data_dir).resolve()), name=Path(data_dir).name)
    mlflow.log_input(dataset, context="training", tags={
        "manifest_sha256": file_sha256(Path(data_dir) / "manifest.csv"),
        "classes": textwrap.shorten(", ".join(classes), 500, placeholder=" ..."),  # MLflow's limit for a value
        "split_sizes": ", ".join(f"{split} {sizes.get(split, 0)}" for split in ("train", "val", "test", "unlabeled")),
    })


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
def pipeline_run(mlflow_cfg: MlflowParams, name: str = "pipeline") -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline execution; exported to child processes through the environment."""
    setup(mlflow_cfg)
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


SERVER_UNREACHABLE = "the MLflow tracking server cannot be reached"
_UNREACHABLE_CAUSES = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                       requests.exceptions.RetryError)


def unreachable_server_error(exc: BaseException) -> ServiceUnavailable | None:
    """A one-paragraph error when ``exc`` comes from an MLflow server that is down, hung or failing, else None:
    its exit code (4) is the one the Prefect flow retries, a server outage passes.

    MLflow wraps the ``requests`` error in an ``MlflowException`` (as its context, not its cause), so the
    whole chain is searched.
    """
    cause = in_chain(exc, lambda e: isinstance(e, _UNREACHABLE_CAUSES))
    if cause is None:
        return None
    return ServiceUnavailable(
        f"{SERVER_UNREACHABLE} at {mlflow.get_tracking_uri()} ({type(cause).__name__}: {cause}). Start it, or "
        "point MLFLOW_TRACKING_URI at a running one, and run the stage again (a stage writes its outputs, and "
        "register moves the champion alias, only when it completes); `segflow train --arch NAME --resume` "
        "continues an interrupted training from its last checkpoint, in the same MLflow run."
    )
