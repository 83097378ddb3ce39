"""Prefect flow: the DVC pipeline, one task per stage, inside one MLflow parent run.

DVC decides what is up to date (an unchanged stage is skipped in under a second); Prefect adds retries with
back-off for transient failures (a killed stage, an unreachable tracking server), logs, and the run record. A
stage that rejects its input, refuses a promotion or crashes is not retried: the same input fails the same way.

    python pipelines/training_pipeline.py            # ephemeral Prefect, embedded MLflow
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from prefect import flow, get_run_logger, task

from segflow import tracking
from segflow.config import PARAMS_FILE, Layout, load_params

# What a failed segflow command prints first (segflow.cli.main): "segflow: error: ..." or "segflow: internal error: ...".
ERROR_MARKER = re.compile(r"segflow: (?:internal )?error: (.*)")
STAGE_EXIT = re.compile(r"exited with (-?\d+)")  # DVC's "failed to run: CMD, exited with N"
KILLED_BY_SIGNAL = {128 + signal.SIGKILL, 128 + signal.SIGTERM}  # a shell's report of a killed process


class StageFailed(RuntimeError):
    """A DVC stage failed in a way that running it again on the same input cannot change: rejected data or
    parameters, a refused promotion, a crash of segflow itself."""


class TransientFailure(StageFailed):
    """A stage killed from outside (out of memory, a preempted node) or a tracking server that could not be
    reached: worth retrying."""


def dvc_stages(project: Path) -> list[str]:
    """Stage names (``train@unet`` for matrix stages) in dependency order, ties broken by name."""
    with Repo(str(project)) as repo:
        graph = repo.index.graph.reverse()  # DVC's edges point from a stage to what it depends on
        return [stage.addressing for stage in nx.lexicographical_topological_sort(graph, key=lambda s: s.addressing)]


def _retry_if_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), TransientFailure)


def dvc_failure(what: str, returncode: int, errors: list[str], stage_exit: int | None = None) -> StageFailed:
    """The error for a failed DVC command, from the ``segflow: error:`` lines it printed and the exit status
    of the stage's command (``stage_exit``; None when DVC failed before running one)."""
    detail = f": {' '.join(errors)}" if errors else "; see the log above"
    status = returncode if stage_exit is None else stage_exit
    if any(tracking.SERVER_UNREACHABLE in error for error in errors):
        return TransientFailure(f"{what} could not reach the tracking server{detail}")
    if status < 0 or status in KILLED_BY_SIGNAL:
        return TransientFailure(f"{what} was killed (exit {status}){detail}")
    return StageFailed(f"{what} failed (exit {status}){detail}")


def run_dvc(args: list[str], project: Path, what: str) -> None:
    """Run ``dvc ARGS`` in ``project`` with its output in the Prefect log; raises :func:`dvc_failure`."""
    logger = get_run_logger()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    errors, stage_exit = [], None
    for line in process.stdout:
        line = line.rstrip()
        if line:
            logger.info(line)
        if error := ERROR_MARKER.search(line):
            errors.append(error.group(1).strip())
        if status := STAGE_EXIT.search(line):
            stage_exit = int(status.group(1))
    if process.wait() != 0:
        raise dvc_failure(what, process.returncode, errors, stage_exit)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_if_transient, task_run_name="{stage}")
def run_stage(stage: str, project: Path) -> None:
    run_dvc(["repro", "--single-item", stage], project, f"stage {stage}")


@flow(name="segflow-pipeline")
def segflow_pipeline(project: str = ".") -> dict:
    """Run every DVC stage in order under one MLflow parent run; returns the registry decision. The stages read
    the project's params.yaml, as DVC does: no other parameters file can reach them, so the flow takes none."""
    project_dir = Path(project).resolve()
    os.chdir(project_dir)
    params = load_params(project_dir / PARAMS_FILE)
    with tracking.pipeline_run(params.mlflow) as run:
        for stage in dvc_stages(project_dir):
            run_stage(stage, project_dir)
    # Its description and summary/ say which model was chosen and why; the stages are nested below it.
    get_run_logger().info("The pipeline's MLflow run: %s", tracking.run_page(run))
    return json.loads((project_dir / Layout.registry).read_text())


if __name__ == "__main__":
    decision = segflow_pipeline(*sys.argv[1:2])
    print(json.dumps(decision, indent=2))
