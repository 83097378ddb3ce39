"""What the MLflow UI shows, against the session's embedded store: experiments open on their runs, a plain
`dvc repro` groups its stage runs under one parent, a training's dataset is logged as its input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from segflow.config import MlflowParams
from segflow.data.fingerprint import file_sha256
from segflow.registry import tracking

# A stage that opens a segflow stage run (and fails when asked to), as every segflow stage does.
STAGE_SCRIPT = """\
import os, sys
from segflow.registry import tracking
from segflow.config import MlflowParams

stage = sys.argv[1]
with tracking.stage_run(MlflowParams(experiment=sys.argv[2]), stage):
    if os.environ.get("FAIL_STAGE") == stage:
        raise SystemExit(f"{stage} failed on purpose")
open(f"{stage}.out", "w").write(stage)
"""


def test_experiments_are_tagged_to_open_on_their_runs_not_on_genai_traces():
    created = tracking.setup(MlflowParams(experiment="kind-new"))
    # One made before segflow tagged experiments (by an older segflow, or in the UI) is tagged when found.
    older = mlflow.create_experiment("kind-older")
    assert tracking.setup(MlflowParams(experiment="kind-older")) == older
    client = MlflowClient()
    for experiment_id in (created, older):
        assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_run_page_opens_in_the_model_training_view():
    with tracking.stage_run(MlflowParams(experiment="pages"), "validate") as run:
        pass
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    local = mlflow.get_tracking_uri()
    assert tracking.run_page(run) == f"`mlflow ui --backend-store-uri {local}`, then http://127.0.0.1:5000/{page}"
    mlflow.set_tracking_uri("https://user:secret@mlflow.example.org/")  # a server: its address, no credentials
    try:
        assert tracking.run_page(run) == f"https://mlflow.example.org/{page}"
    finally:
        mlflow.set_tracking_uri(local)


def _repro(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DVC_NO_ANALYTICS": "1", **env}
    environment.pop(tracking.PARENT_RUN_ENV, None)
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=project, env=environment,
                          capture_output=True, text=True)


def test_the_stage_runs_of_one_plain_dvc_repro_share_a_parent_and_the_next_repro_gets_its_own(tmp_path):
    experiment = "plain-repro"
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    stage = f"{sys.executable} stage.py"
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n"
        f"  first:\n    cmd: {stage} first {experiment}\n    outs: [first.out]\n"
        f"  second:\n    cmd: {stage} second {experiment}\n    deps: [first.out]\n    outs: [second.out]\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)

    first = _repro(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    again = _repro(tmp_path, "--force", "--single-item", "second", FAIL_STAGE="second")
    assert again.returncode != 0

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    stages = [r for r in runs if r.data.tags["segflow.stage"] != "pipeline"]
    parents = {r.info.run_id: r for r in runs if r.data.tags["segflow.stage"] == "pipeline"}
    assert [r.data.tags["segflow.stage"] for r in stages] == ["first", "second", "second"]
    grouped = [r.data.tags.get("mlflow.parentRunId") for r in stages]
    assert grouped[0] == grouped[1] != grouped[2] and set(grouped) == parents.keys()
    # Each parent ends as its repro's last stage did.
    assert parents[grouped[0]].info.status == "FINISHED" and parents[grouped[2]].info.status == "FAILED"
    assert parents[grouped[0]].info.end_time >= stages[1].info.end_time
    assert parents[grouped[0]].data.tags[tracking.REPRO_TAG] != parents[grouped[2]].data.tags[tracking.REPRO_TAG]


def test_a_stage_outside_dvc_and_outside_a_pipeline_has_no_parent(monkeypatch):
    monkeypatch.delenv(tracking.DVC_STAGE, raising=False)
    with tracking.stage_run(MlflowParams(experiment="standalone"), "validate") as run:
        assert tracking.parent_run_id(run) is None


def test_the_training_run_named_by_a_card_counts_only_when_this_store_holds_it():
    tracking.setup(MlflowParams(experiment="cards"))
    client = MlflowClient()
    kept, deleted = (client.create_run(client.get_experiment_by_name("cards").experiment_id).info.run_id
                     for _ in range(2))
    client.delete_run(deleted)
    assert tracking.training_run({tracking.TRAINING_RUN_KEY: kept}) == kept
    assert tracking.training_run({tracking.TRAINING_RUN_KEY: deleted}) is None
    assert tracking.training_run({tracking.TRAINING_RUN_KEY: "0" * 32}) is None  # trained against another store
    assert tracking.training_run({}) is None  # trained before segflow recorded it


def test_the_dataset_input_names_the_manifest_the_classes_and_the_split_sizes(tmp_path):
    data = tmp_path / "ingested"
    data.mkdir()
    (data / "manifest.csv").write_text("image_id,image_path,mask_path,width,height,split\na,a.png,,4,4,\n")
    splits = tmp_path / "splits.csv"
    splits.write_text("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in enumerate(["train"] * 3 + ["val", "test"])))
    tracking.setup(MlflowParams(experiment="datasets"))
    with mlflow.start_run() as run:
        tracking.log_dataset(data, splits, ["background", "thing"])
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    tags = {tag.key: tag.value for tag in logged.tags}
    assert logged.dataset.name == "ingested" and json.loads(logged.dataset.profile)["num_rows"] == 5
    assert tags["mlflow.data.context"] == "training" and tags["classes"] == "background, thing"
    assert tags["split_sizes"] == "train 3, val 1, test 1, unlabeled 0"
    assert tags["manifest_sha256"] == file_sha256(data / "manifest.csv")
