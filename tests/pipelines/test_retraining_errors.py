"""Failures the flows and `segflow schedule` tell apart, checked without servers of their own (the retries on the
session's Prefect server, conftest.py: `prefect_api`)."""

from __future__ import annotations

import subprocess

import pytest
from pipeline_testing import dvc, load_flow_module
from prefect.settings import PREFECT_API_URL, temporary_settings

from segflow.config import ScheduleParams
from segflow.errors import SegflowError
from segflow.orchestration.schedule import cron_schedule, prefect_api_url
from segflow.registry.tracking import SERVER_UNREACHABLE
from stack_testing import free_port


def test_only_killed_stages_and_unreachable_servers_are_retried(project_root):
    training = load_flow_module(project_root, "training_pipeline")
    bad = training.dvc_failure("stage ingest", 1, ["annotations.json: not valid JSON."], stage_exit=2)
    assert type(bad) is training.StageFailed and "annotations.json" in str(bad) and "exit 2" in str(bad)
    crash = training.dvc_failure("stage train@unet", 1, ["internal error: ZeroDivisionError: ..."], stage_exit=3)
    assert type(crash) is training.StageFailed
    down = training.dvc_failure("stage register", 1, [f"{SERVER_UNREACHABLE} at http://mlflow:5000 (...)."], 4)
    assert type(down) is training.TransientFailure and SERVER_UNREACHABLE in str(down)
    # The kind comes from the exit code, never the wording: the same words under exit 2 are the user's to fix.
    quoted = training.dvc_failure("stage ingest", 1, [f"names.txt: line 3 says '{SERVER_UNREACHABLE}'."], 2)
    assert type(quoted) is training.StageFailed
    assert type(training.dvc_failure("stage train", 1, [], stage_exit=-9)) is training.TransientFailure
    assert type(training.dvc_failure("stage train", 1, [], stage_exit=137)) is training.TransientFailure
    assert type(training.dvc_failure("stage train", -15, [])) is training.TransientFailure  # dvc itself killed


def test_schedule_needs_a_running_prefect_server():
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(SegflowError, match="is not set"):
        prefect_api_url()
    nowhere = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: nowhere}), pytest.raises(SegflowError) as error:
        prefect_api_url()
    assert f"no Prefect server answers at PREFECT_API_URL={nowhere}" in str(error.value)


@pytest.mark.parametrize(("setting", "value"), [("cron", "61 * * * *"), ("timezone", "Mars/Olympus")])
def test_a_bad_cron_or_timezone_names_its_key(setting, value):
    with pytest.raises(SegflowError, match=f"schedule.{setting}: .*{value}"):
        cron_schedule(ScheduleParams(**{setting: value}))


def test_data_is_synced_with_the_named_or_default_dvc_remote_only(tmp_path, project_root):
    retraining = load_flow_module(project_root, "retraining")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "remote", "add", "backup", str(tmp_path / "backup"))  # not the default
    assert retraining.dvc_remote(tmp_path, None) is None
    assert retraining.dvc_remote(tmp_path, "backup") == "backup"
    with pytest.raises(SegflowError, match=r"schedule.dvc_remote: DVC has no remote 'team' \(configured: backup\)"):
        retraining.dvc_remote(tmp_path, "team")
    dvc(tmp_path, "remote", "default", "backup")
    assert retraining.dvc_remote(tmp_path, None) == "backup"


@pytest.mark.parametrize(("command", "runs"), [
    ("exit 3", 1),        # segflow crashed (or, exit 1/2, rejected its input): the same input fails again
    ("kill -9 $$", 3),    # killed from outside (the OOM killer, a preempted node): retried twice
])
def test_the_flow_retries_a_killed_stage_but_not_a_failed_one(tmp_path, project_root, prefect_api, command, runs):
    training = load_flow_module(project_root, "training_pipeline")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  flaky:\n    cmd: sh -c 'echo run >> attempts.txt; {command}'\n    outs: [out.txt]\n")
    from prefect import flow

    @flow
    def one_stage() -> None:
        training.run_stage.with_options(retry_delay_seconds=0)("flaky", tmp_path)

    with pytest.raises(training.StageFailed):
        one_stage()
    assert (tmp_path / "attempts.txt").read_text().count("run") == runs
