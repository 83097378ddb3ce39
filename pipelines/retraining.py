"""Prefect flow for scheduled retraining: pull the data, rerun what changed, gate and promote, push.

1. ``dvc pull`` from the project's DVC remote (``schedule.dvc_remote``, else DVC's default remote; with none
   configured, pull and push are skipped): new images reach the raw data folder this way, or by being copied
   into ``data.root``; either way DVC sees the ingest stage's input change.
2. The ``segflow-pipeline`` flow as a subflow: ``dvc repro`` stage by stage (ingest of the new images, training,
   evaluation), with the register stage's gate deciding whether the new model becomes champion.
3. ``dvc push`` of the new outputs, only when the pipeline succeeded.

Transient failures (a server down, a killed process) are retried with back-off; a stage that rejects its
input is not, and the flow run fails with that stage's message. ``params.yaml``'s ``schedule`` section sets
the cron and the concurrency limit of the deployment (``segflow schedule``).

    python pipelines/retraining.py          # one run now (ephemeral Prefect)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dvc.repo import Repo
from prefect import flow, get_run_logger, task
from training_pipeline import run_dvc, segflow_pipeline  # the sibling flow file (Prefect puts its folder on sys.path)

from segflow.config import PARAMS_FILE, load_params
from segflow.errors import SegflowError


def dvc_remote(project: Path, name: str | None) -> str | None:
    """The DVC remote to sync with: ``name`` (which must exist), else the default remote, else None."""
    with Repo(str(project)) as repo:
        remotes = repo.config["remote"]
        default = repo.config["core"].get("remote")
    if name is None:
        return default
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise SegflowError(f"params.yaml: schedule.dvc_remote: DVC has no remote {name!r} (configured: {known}).")
    return name


@task(retries=2, retry_delay_seconds=[10, 60], task_run_name="dvc {command} {remote}")
def sync_data(command: str, remote: str, project: Path) -> None:
    # --allow-missing: outputs nobody pushed yet are rebuilt by `dvc repro` rather than failing the run.
    args = [command, "--allow-missing"] if command == "pull" else [command]
    run_dvc([*args, "--remote", remote], project, f"dvc {command}")


@flow(name="segflow-retraining")
def segflow_retraining(project: str = ".") -> dict:
    """Pull, rerun the pipeline (the register stage gates and promotes), push; returns the registry decision."""
    logger = get_run_logger()
    project_dir = Path(project).resolve()
    params = load_params(project_dir / PARAMS_FILE)
    remote = dvc_remote(project_dir, params.schedule.dvc_remote)
    if remote is None:
        logger.info("no DVC remote configured: nothing to pull or push")
    else:
        sync_data("pull", remote, project_dir)
    decision = segflow_pipeline(project=str(project_dir))
    if remote is not None:
        sync_data("push", remote, project_dir)
    return decision


if __name__ == "__main__":
    print(json.dumps(segflow_retraining(*sys.argv[1:2]), indent=2))
