"""Prefect flow: the DVC pipeline, one task per stage, inside one MLflow parent run.

DVC decides what is up to date (an unchanged stage is skipped in under a second); Prefect adds retries with
back-off for transient failures (a killed stage, an unreachable tracking server), logs, and the run record. A
stage that rejects its input, refuses a promotion or crashes is not retried: the same input fails the same way.

With ``orchestrate.slots`` above 1, stages that do not depend on each other (the ``train@ARCH`` ->
``evaluate@ARCH`` chains) run at the same time, each with its own GPU or share of the CPU threads; DVC's lock
allows one ``dvc repro`` per workspace, so :mod:`segflow.orchestration.stage_runner` runs the stages' commands and records
them with ``dvc commit`` (dvc.lock as a sequential run writes it).

With ``orchestrate.work_pool`` set, each architecture's chain is a flow run of pipelines/architecture.py on that
Prefect work pool (a worker per GPU machine, a pod per run on Kubernetes): the stages before the chains run here
and are pushed to DVC's default remote, the chains run in workspaces of their own and push their outputs and
runs back, and this flow records them from DVC's run cache, then ranks and registers. A chain whose flow run
fails or crashes is submitted again (``orchestrate.work_pool_retries``); one that still fails is left out: the
others are ranked and registered, and the flow run fails naming it.

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

from segflow.config import PARAMS_FILE, Layout, Params, load_params
from segflow.errors import UNAVAILABLE, SegflowError
from segflow.orchestration import schedule, stage_runner
from segflow.registry import tracking

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
    """The error for a failed DVC command: its kind from the exit status of the stage's command (``stage_exit``;
    None when DVC failed before running one; segflow.errors' codes), its message from the ``segflow: error:``
    lines it printed."""
    detail = f": {' '.join(errors)}" if errors else "; see the log above"
    status = returncode if stage_exit is None else stage_exit
    if status == UNAVAILABLE:
        return TransientFailure(f"{what} could not reach a service it needs (exit {status}){detail}")
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


def run_in_order(stages: list[str], project: Path) -> None:
    """``stages`` one after the other, each by ``dvc repro --single-item``; none when DVC finds them all up to
    date (one status check instead of a DVC process per stage: a retraining on unchanged data)."""
    if not stages:
        return
    if not stage_runner.stale(project, stages):
        get_run_logger().info("Stages %s didn't change, skipping", ", ".join(stages))
        return
    for stage in stages:
        run_stage(stage, project)


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


@task(task_run_name="{arch} on the work pool", cache_policy=NONE)
def run_chain_on_pool(arch: str, deployment_id: str, files: dict[str, str], env: dict[str, str]) -> None:
    """One flow run of the architecture's chain on the pool, waited for; raises unless it completed."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment_id, parameters={"arch": arch, "files": files, "env": env}, timeout=None)
    if not flow_run.state.is_completed():
        raise TransientFailure(f"{arch}: flow run {flow_run.name} ended {flow_run.state.name}: {flow_run.state.message}")


def run_on_work_pool(project: Path, params: Params) -> list[str]:
    """The stages before the chains here, each stale chain on ``orchestrate.work_pool``, the stages after them
    here; returns the architectures whose chain did not finish (then ranked and registered without them)."""
    chains = {arch: stage_runner.chain_stages(arch) for arch in params.train.archs}
    before, after = stage_runner.split_plan(stage_runner.plan(project), {s for c in chains.values() for s in c})
    run_in_order(before, project)
    stale = [arch for arch, stages in chains.items() if stage_runner.stale(project, stages)]
    unfinished = []
    if stale:
        run_dvc(["push"], project, "dvc push")
        cfg = params.orchestrate
        deployment_id = schedule.architecture_deployment(project, cfg.work_pool, cfg.heartbeat_seconds)
        env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(params.mlflow),
               tracking.PARENT_RUN_ENV: os.environ[tracking.PARENT_RUN_ENV]}
        submit = run_chain_on_pool.with_options(retries=cfg.work_pool_retries, retry_delay_seconds=5)
        futures = {arch: submit.submit(arch, deployment_id, stage_runner.workspace_files(project, chains[arch]), env)
                   for arch in stale}
        wait(list(futures.values()))
        unfinished = [arch for arch, future in futures.items() if not future.state.is_completed()]
        stage_runner.restore(project, [stage for arch in stale if arch not in unfinished for stage in chains[arch]])
    if not unfinished:
        run_in_order(after, project)
        return []
    # Ranked and registered from the chains that finished, not recorded in dvc.lock: the next run redoes them.
    without = [arg for arch in unfinished for arg in ("--without", arch)]
    for stage in after:
        run_logged([*stage_runner.command(project, stage).split(), *without], project, f"stage {stage}", {})
    return unfinished


def check_work_pool_setup(project: Path, params: Params) -> None:
    """The chains run elsewhere: they need a tracking server and a DVC remote that they can reach."""
    uri = tracking.tracking_uri(params.mlflow)
    if not uri.startswith(("http://", "https://")):
        raise SegflowError(
            f"orchestrate.work_pool: {params.orchestrate.work_pool}: the architectures' flow runs track to MLflow "
            f"from other processes or machines, and the tracking store is {uri}. Set mlflow.tracking_uri (or "
            "MLFLOW_TRACKING_URI) to an MLflow server (the team stack's: infra/README.md).")
    if stage_runner.default_remote(project) is None:
        raise SegflowError(
            f"orchestrate.work_pool: {params.orchestrate.work_pool}: the architectures' flow runs exchange data "
            f"through DVC's default remote, and {project} has none. Add one the workers can reach: "
            "`dvc remote add -d NAME URL`.")


@flow(name="segflow-pipeline")
def segflow_pipeline(project: str = ".") -> dict:
    """Run every DVC stage in order under one MLflow parent run; returns the registry decision. The stages read
    the project's params.yaml, as DVC does: no other parameters file can reach them, so the flow takes none."""
    project_dir = Path(project).resolve()
    os.chdir(project_dir)
    params = load_params(project_dir / PARAMS_FILE)
    if params.orchestrate.work_pool:
        check_work_pool_setup(project_dir, params)
    unfinished = []
    with tracking.pipeline_run(params.mlflow) as run:
        if params.orchestrate.work_pool:
            unfinished = run_on_work_pool(project_dir, params)
        elif params.orchestrate.slots == 1:
            run_in_order([stage.name for stage in stage_runner.plan(project_dir)], project_dir)
        else:
            run_concurrently(project_dir, params.orchestrate.slots)
    # Its description and summary/ say which model was chosen and why; the stages are nested below it.
    get_run_logger().info("The pipeline's MLflow run: %s", tracking.run_page(run))
    if unfinished:
        raise StageFailed(
            f"{', '.join(unfinished)}: the chain did not finish on work pool {params.orchestrate.work_pool} "
            f"(tried {params.orchestrate.work_pool_retries + 1} times; see its flow runs); the others were ranked "
            "and registered without it, and the next run trains it again.")
    return json.loads((project_dir / Layout.registry).read_text())


if __name__ == "__main__":
    decision = segflow_pipeline(*sys.argv[1:2])
    print(json.dumps(decision, indent=2))
