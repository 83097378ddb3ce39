"""Prefect flow: the DVC pipeline, one task per stage, inside one MLflow parent run.

DVC decides what is up to date (an unchanged stage is skipped in under a second); Prefect adds retries with
back-off for transient failures, logs, and the run record. A stage that fails on bad input is not retried.

    python pipelines/training_pipeline.py            # ephemeral Prefect, embedded MLflow
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from prefect import flow, get_run_logger, task

from segflow import tracking
from segflow.config import Layout, load_params

USER_ERROR_MARKER = "segflow: error:"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero for a reason that may pass (a server down, a killed process)."""


class BadInput(StageFailed):
    """A stage rejected the data or the parameters: retrying cannot help."""


def dvc_stages(project: Path) -> list[str]:
    """Stage names (``train@unet`` for matrix stages) in dependency order, ties broken by name."""
    with Repo(str(project)) as repo:
        graph = repo.index.graph.reverse()  # DVC's edges point from a stage to what it depends on
        return [stage.addressing for stage in nx.lexicographical_topological_sort(graph, key=lambda s: s.addressing)]


def _retry_unless_bad_input(task, task_run, state) -> bool:
    return not isinstance(state.result(raise_on_failure=False), BadInput)


def dvc_failure(what: str, returncode: int, user_errors: list[str]) -> StageFailed:
    """The error for a failed DVC command, from the ``segflow: error:`` lines it printed.

    A stage that could not reach the MLflow server failed for a reason that may pass, so only the other
    user errors make it bad input.
    """
    rejected = [error for error in user_errors if tracking.SERVER_UNREACHABLE not in error]
    if rejected:
        return BadInput(f"{what} rejected its input: {' '.join(rejected)}")
    detail = f": {' '.join(user_errors)}" if user_errors else "; see the log above"
    return StageFailed(f"{what} failed (exit {returncode}){detail}")


def run_dvc(args: list[str], project: Path, what: str) -> None:
    """Run ``dvc ARGS`` in ``project`` with its output in the Prefect log; raises :func:`dvc_failure`."""
    logger = get_run_logger()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    user_errors = []
    for line in process.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        if USER_ERROR_MARKER in line:
            user_errors.append(line.split(USER_ERROR_MARKER, 1)[1].strip())
    if process.wait() != 0:
        raise dvc_failure(what, process.returncode, user_errors)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_bad_input, task_run_name="{stage}")
def run_stage(stage: str, project: Path) -> None:
    run_dvc(["repro", "--single-item", stage], project, f"stage {stage}")


@flow(name="segflow-pipeline")
def segflow_pipeline(project: str = ".", params_file: str = "params.yaml") -> dict:
    """Run every DVC stage in order under one MLflow parent run; returns the registry decision."""
    project_dir = Path(project).resolve()
    os.chdir(project_dir)
    params = load_params(project_dir / params_file)
    with tracking.pipeline_run(params.mlflow):
        for stage in dvc_stages(project_dir):
            run_stage(stage, project_dir)
    return json.loads((project_dir / Layout.registry).read_text())


if __name__ == "__main__":
    decision = segflow_pipeline(*sys.argv[1:2])
    print(json.dumps(decision, indent=2))
