"""prefect.yaml (for `prefect deploy`) describes the deployment `segflow schedule` registers from params.yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from segflow.config import load_params
from segflow.orchestration.schedule import ENTRYPOINT, cron_schedule

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_prefect_deploy_accepts_it(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` parses the file into

    (deployment,) = PrefectYamlModel.model_validate(prefect_yaml).deployments
    assert deployment.entrypoint == ENTRYPOINT


def test_it_matches_the_schedule_in_params(prefect_yaml):
    cfg = load_params(ROOT / "params.yaml").schedule
    cron_schedule(cfg)  # the cron and timezone are valid
    (deployment,) = prefect_yaml["deployments"]
    assert deployment["name"] == cfg.deployment
    assert deployment["work_pool"]["name"] == cfg.work_pool
    assert deployment["schedules"] == [{"cron": cfg.cron, "timezone": cfg.timezone}]
    assert deployment["concurrency_limit"] == {"limit": cfg.concurrency_limit,
                                               "collision_strategy": cfg.on_overlap.upper()}
    assert "parameters" not in deployment  # the flow runs the project's params.yaml, the one DVC reads


def test_runs_start_where_the_worker_image_has_the_project(prefect_yaml):
    workdir = re.search(r"^WORKDIR\s+(\S+)", (ROOT / "infra/worker/Dockerfile").read_text(), re.MULTILINE).group(1)
    assert prefect_yaml["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]


def test_entrypoint_is_the_retraining_flow():
    from prefect.flows import load_flow_from_entrypoint

    path, name = ENTRYPOINT.split(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
    assert flow.name == "segflow-retraining"
    assert set(flow.parameters.properties) == {"project"}
