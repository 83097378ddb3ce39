"""Prefect flow: the DVC pipeline, one task per stage, inside one MLflow parent run.

DVC decides what is up to date (an unchanged stage is skipped in under a second); Prefect adds retries with
back-off for transient failures (a killed stage, an unreachable tracking server), logs, and the run record. A
stage that rejects its input, refuses a promotion or crashes is not retried: the same input fails the same way.

With ``orchestrate.slots`` above 1, stages that do not depend on each other (the ``train@ARCH`` ->
``evaluate@ARCH`` chains) run at the same time, each with its own GPU or share of the CPU threads; DVC's lock
allows one ``dvc repro`` per workspace, so :mod:`segflow.stage_runner` runs the stages' commands and records
them with ``dvc commit`` (dvc.lock as a sequential run writes it).

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

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import wait

from segflow import stage_runner, tracking
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
    run_logged([sys.executable, "-m", "dvc", *args], project, what, {})


def run_logged(command: list[str] | str, project: Path, what: str, env: dict[str, str]) -> None:
    """Run ``command`` (a shell command line when a string, as DVC runs a stage's) in ``project`` with ``env``
    added and this interpreter's scripts (``segflow``) first on PATH, its output in the Prefect log; raises
    :func:`dvc_failure`."""
    logger = get_run_logger()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    process = subprocess.Popen(
        command, shell=isinstance(command, str), cwd=project, env={**os.environ, **env, "PATH": path},
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


# The runner and the slots are shared objects, not inputs to cache on.
@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_if_transient, task_run_name="{stage}",
      cache_policy=NONE)
def run_stage_in_slot(stage: str, runner: stage_runner.StageRunner, slots: stage_runner.Slots) -> None:
    command = runner.start(stage)
    if command is None:
        get_run_logger().info("Stage '%s' didn't change, skipping", stage)
        return
    with slots.take() as slot_env:
        get_run_logger().info("Running stage '%s' with %s:\n> %s", stage, slot_env, command)
        run_logged(command, runner.project, f"stage {stage}", {**runner.environment(stage), **slot_env})
    runner.commit(stage)


def run_concurrently(project: Path, slots: int) -> None:
    """Every stage once its upstream stages are recorded, at most ``slots`` at a time; raises the first
    failure in dependency order."""
    import torch  # the GPUs to share out; only this path needs them

    planned = stage_runner.plan(project)
    runner = stage_runner.StageRunner(project, [stage.name for stage in planned])
    pool = stage_runner.Slots(slots, torch.cuda.device_count())
    futures = {}
    for stage in planned:
        futures[stage.name] = run_stage_in_slot.submit(
            stage.name, runner, pool, wait_for=[futures[name] for name in stage.upstream])
    wait(list(futures.values()))
    for future in futures.values():
        if future.state.is_failed():
            future.result()  # raises the stage's error
    runner.finish()


@flow(name="segflow-pipeline")
def segflow_pipeline(project: str = ".") -> dict:
    """Run every DVC stage in order under one MLflow parent run; returns the registry decision. The stages read
    the project's params.yaml, as DVC does: no other parameters file can reach them, so the flow takes none."""
    project_dir = Path(project).resolve()
    os.chdir(project_dir)
    params = load_params(project_dir / PARAMS_FILE)
    with tracking.pipeline_run(params.mlflow) as run:
        if params.orchestrate.slots == 1:
            for stage in stage_runner.plan(project_dir):
                run_stage(stage.name, project_dir)
        else:
            run_concurrently(project_dir, params.orchestrate.slots)
    # Its description and summary/ say which model was chosen and why; the stages are nested below it.
    get_run_logger().info("The pipeline's MLflow run: %s", tracking.run_page(run))
    return json.loads((project_dir / Layout.registry).read_text())


if __name__ == "__main__":
    decision = segflow_pipeline(*sys.argv[1:2])
    print(json.dumps(decision, indent=2))
