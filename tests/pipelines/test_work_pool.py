"""``orchestrate.work_pool``: each architecture's chain is a flow run on a real Prefect work pool, run by two real
``process`` workers, its data through a local DVC remote and its runs tracked to a real MLflow server; one
worker is killed while it trains, and the run still finishes with DVC's record complete."""

from __future__ import annotations

import contextvars
import copy
import json
import os
import shutil
import signal
import threading

import mlflow
import pytest
import yaml
from pipeline_testing import TINY, dvc, load_flow_module, make_project, merge, mlflow_at, stack_env, wait_for
from prefect.automations import Automation
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from segflow.config import Layout, load_params
from segflow.errors import SegflowError
from segflow.orchestration import schedule, stage_runner
from stack_testing import VENV_BIN, ServerProcess

pytestmark = pytest.mark.slow

POOL = "segflow-test-pool"
ARCHS = ["pspnet", "unet_original"]
EXPERIMENT = "segflow-work-pool"  # its own, on the session's MLflow server
PARAMS = merge(copy.deepcopy(TINY), {
    "synth": {"num_unlabeled": 0},  # one teacher, not two: the test is about the orchestration
    "train": {"archs": ARCHS, "epochs": 1}, "teacher": {"epochs": 1, "warm_start": False},
    "models": {"unet_original": {"width": 0.125}},
    "mlflow": {"experiment": EXPERIMENT},
    "orchestrate": {"work_pool": POOL, "work_pool_retries": 1, "heartbeat_seconds": 30},
})


@pytest.fixture
def workers(servers, prefect, tmp_path):
    """Two `prefect worker start --type process` on the pool, each in its own process group."""
    schedule.ensure_work_pool(POOL)  # before the workers: two creating it at once can meet a locked database
    started = []
    for name in ("worker-a", "worker-b"):
        home = tmp_path / name
        home.mkdir()
        env = stack_env(servers, home, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
        command = [str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", name,
                   "--limit", "1"]  # one chain at a time, as on a one-GPU machine
        started.append(ServerProcess(command, env, home / "worker.log").start())
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def _architecture_runs(client) -> list:
    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["segflow-architecture"])))


def test_chains_run_on_two_workers_and_a_killed_worker_costs_a_retry_not_the_run(
        servers, prefect, workers, tmp_path, project_root, monkeypatch):
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")  # `segflow`
    (tmp_path / "project").mkdir()
    project = make_project(tmp_path / "project", project_root, PARAMS)
    dvc(project, "remote", "add", "-d", "team", str(tmp_path / "dvc-remote"))
    monkeypatch.chdir(project)
    flow_module = load_flow_module(project_root, "training_pipeline")

    outcome: dict = {}

    def run_pipeline() -> None:
        with mlflow_at(servers["mlflow"].url):
            try:
                outcome["decision"] = flow_module.segflow_pipeline(str(project))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

    # In a thread of its own, with this thread's context (the Prefect server as the API, prefect_api's setting).
    pipeline = threading.Thread(target=contextvars.copy_context().run, args=(run_pipeline,), daemon=True)
    pipeline.start()
    # Kill the worker that took the first chain, once that chain's training has started.
    running = wait_for(lambda: [r for r in _architecture_runs(prefect) if r.state.is_running()], 600,
                       "a chain's flow run to start on a worker")[0]
    killed = running.parameters["arch"]
    training = f"Flow run '{killed}' - Running stage 'train@{killed}'"  # in the log of the worker that runs it
    victim = wait_for(lambda: next((w for w in workers if training in w.log.read_text()), None), 300,
                      "its training to start")
    os.killpg(victim.process.pid, signal.SIGKILL)
    pipeline.join(timeout=900)
    assert not pipeline.is_alive(), "the pipeline flow did not finish"
    assert "error" not in outcome, outcome.get("error")

    # The killed run was crashed by the missed heartbeats, submitted again and finished on the other worker.
    runs = _architecture_runs(prefect)
    states = {arch: sorted(r.state.type.value for r in runs if r.parameters["arch"] == arch) for arch in ARCHS}
    assert states[killed] == ["COMPLETED", "CRASHED"], states
    assert states[next(a for a in ARCHS if a != killed)] == ["COMPLETED"], states
    # Had the flow run's process died with the worker (a lost machine or pod), its missing heartbeats would
    # have crashed it: the automation that does so watches the chains' flow runs.
    automation = Automation.read(name=schedule.CRASH_DETECTION)
    assert automation.trigger.within.total_seconds() == 3 * PARAMS["orchestrate"]["heartbeat_seconds"]
    # DVC's record is complete: `dvc repro` has nothing to do, and the chains' outputs are here.
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert all(f"{stage}@{arch}" in lock for stage in ("train", "evaluate") for arch in ARCHS)
    for arch in ARCHS:
        assert (project / Layout.evaluation / arch / "scores.json").exists()
    assert outcome["decision"]["candidate"] in [*ARCHS, "teacher"]
    # The chains' stage runs are on the MLflow server, under the pipeline's run.
    with mlflow_at(servers["mlflow"].url):
        trained = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                     filter_string="tags.`segflow.stage` = 'train'")
        (pipeline_run,) = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                             filter_string="tags.`segflow.stage` = 'pipeline'")
    chains = {run.data.params["arch"] for run in trained
              if run.data.tags.get("mlflow.parentRunId") == pipeline_run.info.run_id and run.info.status == "FINISHED"}
    assert chains >= set(ARCHS)

    # A chain that fails every time is left out: the others are ranked and registered, the flow run fails naming
    # it, and what was registered without it is not recorded (the next run does it again). Its fault: the parent
    # sends its workspace a params.yaml that does not parse, which the worker refuses (injected in this process,
    # the parent's); its model folder gone, the chain is the only stale stage.
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["orchestrate"]["work_pool_retries"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(project / Layout.models / "unet_original")
    sent = stage_runner.workspace_files
    monkeypatch.setattr(stage_runner, "workspace_files", lambda root, stages: {
        **sent(root, stages), **({"params.yaml": "train: ["} if "train@unet_original" in stages else {})})
    with mlflow_at(servers["mlflow"].url), pytest.raises(flow_module.StageFailed, match="unet_original: the chain "
                                                         "did not finish on work pool segflow-test-pool"):
        flow_module.segflow_pipeline(str(project))
    failed = [r.parameters["arch"] for r in _architecture_runs(prefect) if r.state.is_failed()]
    assert failed == ["unet_original"], failed  # pspnet's chain was up to date: not sent
    ranked = {row["name"] for row in json.loads((project / "leaderboard/leaderboard.json").read_text())}
    assert "pspnet" in ranked and "unet_original" not in ranked
    assert json.loads((project / Layout.registry).read_text())["candidate"] != "unet_original"
    stale = json.loads(dvc(project, "status", "--json").stdout)
    assert {"train@unet_original", "leaderboard", "register"} <= set(stale) and "train@pspnet" not in stale


def test_a_work_pool_needs_a_tracking_server_and_a_dvc_remote(tmp_path, project_root, monkeypatch):
    project = make_project(tmp_path, project_root, PARAMS)
    check = load_flow_module(project_root, "training_pipeline").check_work_pool_setup
    params = load_params(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SegflowError, match=r"orchestrate.work_pool: segflow-test-pool: .* MLflow server"):
        check(project, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with pytest.raises(SegflowError, match=r"DVC's default remote, and .* has none. .*dvc remote add -d"):
        check(project, params)
    dvc(project, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    check(project, params)
