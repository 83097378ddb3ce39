"""A small segflow project in a temporary folder, for the tests that run the whole pipeline."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import yaml

# Small enough for the whole pipeline to run in about a minute on two cores.
TINY = {
    "synth": {"num_labeled": 24, "num_unlabeled": 8, "image_size": 48},
    # One architecture besides the teacher's (unet): two candidates of two architectures to choose from.
    "train": {"archs": ["pspnet"], "epochs": 2, "batch_size": 4, "crop_size": 48},
    "teacher": {"arch": "unet", "epochs": 2},
    # Two epochs do not beat predicting the background everywhere: the floor (tests/test_register.py) would
    # rightly promote nothing, and these tests are about the plumbing from data to a served champion.
    "register": {"floor": False},
}

SEGFLOW = str(Path(sys.executable).parent / "segflow")
MODEL_NAME = "segflow-e2e"
DEPLOYMENT = "segflow-retraining/scheduled"
# The one run of the whole pipeline in a session (tests/pipelines/conftest.py: `scheduled_run`): TINY, run by the
# served cron deployment on the Prefect and MLflow servers. The end-to-end tests (test_training_pipeline.py) check
# its outputs, the scheduled-retraining tests (test_scheduled_retraining.py) its orchestration.
SCHEDULE = {"cron": "30 4 * * 2", "timezone": "Europe/Berlin", "concurrency_limit": 1}


@contextlib.contextmanager
def mlflow_at(url: str):
    """MLflow's tracking and registry URIs on ``url`` inside the block (MLflow also sets MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, which segflow and its worker processes read), the embedded store's again after it."""
    import mlflow

    embedded = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(embedded[0])
        mlflow.set_registry_uri(embedded[1])


def merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


PIPELINE = merge(copy.deepcopy(TINY), {"register": {"model_name": MODEL_NAME}, "schedule": SCHEDULE})


def candidate_arch(candidate: str) -> str:
    """The architecture of a candidate of the PIPELINE run: its name, or the teacher's architecture."""
    return PIPELINE["teacher"]["arch"] if candidate == "teacher" else candidate


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stack_env(servers, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_API_URL=servers["prefect"].url, MLFLOW_TRACKING_URI=servers["mlflow"].url,
               PREFECT_HOME=str(prefect_home), **extra)
    env.pop("SEGFLOW_PARENT_RUN_ID", None)
    return env


def make_project(root: Path, project_root: Path, params: dict) -> Path:
    """dvc.yaml, the flows and the code of the repository, its params.yaml merged with ``params``; git and DVC
    initialised."""
    for name in ("dvc.yaml", ".gitignore"):  # the repository's .gitignore must not hide what DVC writes
        shutil.copy(project_root / name, root)
    merged = merge(yaml.safe_load((project_root / "params.yaml").read_text()), params)
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    # Code dependencies of the stages, so DVC sees the same graph as in the repository; the flows, for deployments.
    for folder in ("src", "pipelines"):
        shutil.copytree(project_root / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    shutil.copytree(project_root / ".dvc/plots", root / ".dvc/plots")  # the plot templates dvc.yaml names
    return root


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True, text=True)


def load_flow_module(project_root: Path, name: str) -> ModuleType:
    """``pipelines/NAME.py`` as a module (the folder is no package; the flows import their siblings)."""
    pipelines = str(project_root / "pipelines")
    if pipelines not in sys.path:
        sys.path.insert(0, pipelines)
    spec = importlib.util.spec_from_file_location(name, project_root / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

