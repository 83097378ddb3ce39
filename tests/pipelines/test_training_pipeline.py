"""End to end: the Prefect flow runs every DVC stage on a tiny generated dataset and promotes a model.

The run is the session's one run of the whole pipeline (conftest.py: `scheduled_run`): the served retraining
deployment runs the flow on the Prefect server, tracking on the MLflow server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from pipeline_testing import PIPELINE, mlflow_at

from segflow.config import parse_params
from segflow.data.imageio import read_image
from segflow.inference.scores import floor_failures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def tracking_on_the_server(servers):
    """MLflow's tracking and registry URIs on the MLflow server the pipeline ran against, for this module."""
    with mlflow_at(servers["mlflow"].url):
        yield servers["mlflow"]


@pytest.fixture(scope="module")
def pipeline_decision(scheduled_run) -> dict:
    """What the flow returned: the registry decision of the session's pipeline run."""
    final = scheduled_run["final"]
    assert final.is_completed(), final.message
    return scheduled_run["decision"]


@pytest.fixture
def put_back(project):
    """The project is the session's (conftest.py): the parameters and metrics a test changes are put back."""
    files = [project / "params.yaml", *sorted((project / "metrics").glob("*.json"))]
    ran = {path: path.read_bytes() for path in files}
    yield
    for path, content in ran.items():
        path.write_bytes(content)


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)


def test_pipeline_registers_the_best_candidate_on_val_and_promotes_it_above_the_floor(pipeline_decision, project):
    names = [*PIPELINE["train"]["archs"], "teacher"]
    scores = {name: json.loads((project / "evaluation" / name / "scores.json").read_text()) for name in names}
    for name in names:
        headline = json.loads((project / "metrics" / f"{name}.json").read_text())
        assert set(headline) == {"val_miou", "test_miou", "test_pixel_accuracy", "test_mean_class_accuracy"}
        assert 0 <= headline["test_miou"] <= 1 and headline["val_miou"] == scores[name]["val"]["miou"]
        assert (project / "evaluation" / name / "confusion_matrix.png").stat().st_size > 0
    best = max(names, key=lambda name: scores[name]["val"]["miou"])  # the teacher is a candidate too
    assert pipeline_decision["candidate"] == best
    assert pipeline_decision["promoted"] == (not floor_failures(scores[best], parse_params(PIPELINE).register_))
    assert json.loads((project / "metrics/pseudo_label.json").read_text())["coverage"] > 0
    assert (project / "data/validation/data_docs/index.html").exists()
    rows = json.loads((project / "leaderboard/leaderboard.json").read_text())
    board = [row for row in rows if "kept" not in row]
    assert [r["name"] for r in board if r["selected"]] == [best]
    assert [r["val_miou"] for r in board] == sorted((r["val_miou"] for r in board), reverse=True)
    assert all(row["gflops"] > 0 and row["train_seconds"] > 0 for row in board)
    # The teacher stage's evidence: both teachers, scored on val and test, and the decision taken.
    semi = json.loads((project / "metrics/semi_supervised.json").read_text())
    twins = {row["name"]: row for row in rows if "kept" in row}
    assert set(twins) == {"teacher, labeled-only", "teacher, with unlabeled"}
    assert twins["teacher, with unlabeled"]["kept"] == semi["use_unlabeled"]
    assert twins["teacher, labeled-only"]["miou"] == semi["labeled_only"]["test_miou"]
    assert semi["labeled_only"]["steps"] == semi["with_unlabeled"]["steps"]
    board_text = (project / "leaderboard/leaderboard.md").read_text()
    assert "Decision: the unlabeled images are" in board_text
    # teacher.warm_start (the default): both arms continued from a labeled-only teacher, and the board says so
    assert semi["warm_start"] and semi["start"]["steps"] == semi["labeled_only"]["steps"]
    assert "both continuing from a labeled-only teacher trained first" in board_text
    assert "| start (labeled-only) |" in board_text


def test_champion_loads_without_pickle_and_predicts_a_mask(pipeline_decision, project):
    client = MlflowClient()
    name = PIPELINE["register"]["model_name"]
    champion = client.get_model_version_by_alias(name, "champion")  # the tiny run's best clears the floor
    assert str(champion.version) == pipeline_decision["version"] and pipeline_decision["promoted"]
    assert champion.tags["test_data_hash"] and champion.tags["arch"] == pipeline_decision["arch"]
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    image = read_image(next((project / "data/synthetic/images").iterdir()))
    mask = model.predict(image)
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
    classes = json.loads((project / "data/ingested/classes.json").read_text())["names"]
    assert mask.max() < len(classes)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    assert not list(local.rglob("*.pkl")) and list(local.rglob("*.safetensors"))


def test_stage_runs_are_nested_under_one_parent_run(pipeline_decision):
    runs = mlflow.search_runs(experiment_names=["segflow"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("segflow.stage") == "pipeline"]
    assert parents
    parent_id = parents[0].info.run_id
    children = {r.data.tags.get("segflow.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert {"train", "evaluate", "pseudo_label", "register", "validate"} <= children


def test_the_mlflow_ui_shows_the_champions_training_its_evaluation_and_why_it_was_chosen(pipeline_decision, project):
    client = MlflowClient()
    version = client.get_model_version(PIPELINE["register"]["model_name"], pipeline_decision["version"])
    card = json.loads((project / "models" / pipeline_decision["candidate"] / "model.json").read_text())
    # The version's source run is the chosen model's training run (the kept arm's, for the teacher) ...
    assert version.run_id == card["extra"]["mlflow_run_id"]
    training = client.get_run(version.run_id)
    assert training.data.tags["segflow.stage"] == "train"
    # ... which holds its evaluation beside its training, and the data it was trained on.
    assert {"test_miou", "evaluated_val_miou", "best_val_miou"} <= training.data.metrics.keys()
    evaluation = {f.path for f in client.list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/overlays", "evaluation/scores.json"} <= evaluation
    assert "checkpoint/model.json" in {f.path for f in client.list_artifacts(version.run_id, "checkpoint")}
    (dataset,) = training.inputs.dataset_inputs
    classes = json.loads((project / "data/ingested/classes.json").read_text())["names"]
    assert {tag.key: tag.value for tag in dataset.tags}["classes"] == ", ".join(classes)

    # The pipeline run sums up: the leaderboard, the decision, the champion before and after.
    pipeline = client.get_run(client.get_run(version.tags["register_run_id"]).data.tags["mlflow.parentRunId"])
    assert pipeline.data.tags["segflow.stage"] == "pipeline"
    summary = {f.path for f in client.list_artifacts(pipeline.info.run_id, "summary")}
    assert {"summary/leaderboard.md", "summary/decision.json", "summary/champion_history.md"} <= summary
    assert pipeline.data.tags["segflow.chosen"] == pipeline_decision["candidate"]
    promoted = pipeline_decision["promoted"]  # over a registry without a champion yet
    assert pipeline.data.tags["segflow.champion_after"] == (f"v{pipeline_decision['version']}" if promoted else "none")
    assert pipeline_decision["reason"] in pipeline.data.tags["mlflow.note.content"]
    experiment = client.get_experiment(training.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_second_repro_is_a_no_op_and_a_param_change_reruns_only_its_stages(pipeline_decision, project, put_back):
    assert "up to date" in _dvc(project, "status").stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["num_overlays"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = _dvc(project, "status", "--json")
    changed = set(json.loads(stale.stdout))
    assert changed == {"evaluate@pspnet", "evaluate_teacher"}


def test_dvc_metrics_and_plots_compare_across_commits(pipeline_decision, project, put_back):
    git = ["git", "-c", "user.name=segflow", "-c", "user.email=segflow@example.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline run"], cwd=project, check=True)
    path = project / "metrics" / "pspnet.json"
    committed = json.loads(path.read_text())
    path.write_text(json.dumps({**committed, "test_miou": committed["test_miou"] + 0.1}))  # a new evaluation

    diff = json.loads(_dvc(project, "metrics", "diff", "--json").stdout)
    change = diff["metrics/pspnet.json"]["test_miou"]
    assert change["old"] == pytest.approx(committed["test_miou"]) and change["diff"] == pytest.approx(0.1)
    shown = _dvc(project, "metrics", "show").stdout  # the headline figures, one row per model: fits a terminal
    assert "val_miou" in shown and "test_pixel_accuracy" in shown and max(map(len, shown.splitlines())) <= 120

    plots = _dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    charts = json.loads(plots.stdout)["data"]
    assert "plots/per_class_iou/teacher.csv" in charts
    for chart in ("val mIoU per epoch", "train loss per epoch"):  # every candidate's curve in one chart
        (content,) = [plot["content"] for plot in charts[chart]]
        assert content["encoding"]["color"]["field"] == "model"
        assert {row["model"] for row in content["data"]["values"]} == {*PIPELINE["train"]["archs"], "teacher"}
