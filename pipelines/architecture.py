"""Prefect flow: one architecture's ``train`` -> ``evaluate`` chain in a workspace of its own, for a work pool.

The pipeline flow (training_pipeline.py, with ``orchestrate.work_pool`` set) submits one run of this flow per
architecture to the pool; a worker (one per GPU machine, or a Kubernetes pod per run) runs it in the deployment's
source folder, the project:

1. a scratch workspace: the parent's dvc.yaml, params.yaml and dvc.lock (flow parameters, so the chain sees the
   parent's exact record), the project's DVC configuration, and the chain's code dependencies copied from here;
2. ``dvc pull`` of the outputs the chain reads, which the parent pushed to DVC's default remote;
3. ``dvc repro --single-item`` of each stage, tracking to the parent's MLflow server under its pipeline run;
4. ``dvc push --run-cache``: the outputs and DVC's record of the runs, from which the parent records the stages
   (restored from the run cache, as ``dvc repro`` restores a stage it ran before) without running them again.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from training_pipeline import run_dvc, run_logged  # the sibling flow file (Prefect puts its folder on sys.path)

from segflow.orchestration import stage_runner


@flow(name="segflow-architecture", flow_run_name="{arch}")
def segflow_architecture(arch: str, files: dict[str, str], env: dict[str, str]) -> None:
    """Reproduce ``arch``'s chain from the parent's pipeline ``files`` and push it; ``env``: the stages'
    tracking server and parent run (``MLFLOW_TRACKING_URI``, ``SEGFLOW_PARENT_RUN_ID``)."""
    stage_runner.check_sent_env(env)  # and the files, in prepare_workspace: a worker trusts nothing it is sent
    stages = stage_runner.chain_stages(arch)
    workspace = Path(tempfile.mkdtemp(prefix=f"segflow-{arch}-"))
    try:
        upstream = stage_runner.prepare_workspace(Path.cwd(), workspace, files, stages)
        get_run_logger().info("Workspace %s: pulling the outputs of %s", workspace, ", ".join(upstream))
        run_dvc(["pull", *upstream], workspace, "dvc pull")
        for stage in stages:
            run_logged([sys.executable, "-m", "dvc", "repro", "--single-item", stage], workspace, f"stage {stage}", env)
        run_dvc(["push", "--run-cache", *stages], workspace, "dvc push")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
