"""Registry gate against a real (embedded) MLflow store: promote only a better challenger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from register_testing import ARCH, promote, register_stage, register_version, write_scores
from segflow.config import parse_params


def test_first_version_becomes_champion_and_a_worse_one_stays_challenger(workspace):
    client = MlflowClient()
    first = register_version(workspace, "gate-a", 0.50)
    assert first.promoted and first.reason == "no champion yet"
    worse = register_version(workspace, "gate-a", 0.505)  # better, but not by the 0.01 margin
    assert not worse.promoted and worse.champion_score == pytest.approx(0.50)
    assert str(client.get_model_version_by_alias("gate-a", "champion").version) == first.version
    assert str(client.get_model_version_by_alias("gate-a", "challenger").version) == worse.version
    better = register_version(workspace, "gate-a", 0.60)
    assert better.promoted
    assert str(client.get_model_version_by_alias("gate-a", "champion").version) == better.version
    history = json.loads(client.get_registered_model("gate-a").tags["champion_history"])
    assert [h["version"] for h in history] == [first.version, better.version]
    assert json.loads((workspace / "decision.json").read_text())["version"] == better.version


def test_champion_scored_on_other_test_data_is_rescored_before_comparing(workspace):
    register_version(workspace, "gate-b", 0.99, data_hash="old-test-split")  # a score from other data
    decision = register_version(workspace, "gate-b", 0.30, data_hash="new-test-split")
    # The champion's 0.99 must not be used: its weights are re-scored on the current test image.
    assert decision.champion_score is not None and decision.champion_score < 0.99
    assert decision.promoted == (0.30 > decision.champion_score + 0.01)


def test_a_registry_that_lost_the_projects_history_is_refused_until_forced(workspace, tmp_path, monkeypatch):
    from segflow.errors import SegflowError

    first = register_version(workspace, "lost-history", 0.50)
    _other_store(tmp_path, monkeypatch, "new-mlflow.db")
    with pytest.raises(SegflowError, match=(
            rf"registrations.jsonl: this project registered lost-history v{first.version} on .* but the model "
            r"registry at sqlite:///.*new-mlflow.db has no model named 'lost-history': it has lost its history")):
        register_version(workspace, "lost-history", 0.60)
    params = parse_params({"train": {"archs": [ARCH]}, "register": {"model_name": "lost-history"}})
    forced = register_stage(params, candidates=[ARCH], evaluation_dir=workspace / "evaluation",
                      models_dir=workspace / "models", data_dir=workspace / "data", splits_csv=workspace / "splits.csv",
                      out_file=workspace / "decision.json", force=True)
    assert forced.version == "1" and forced.promoted
    assert register_version(workspace, "lost-history", 0.70).version == "2"  # the new history is the record now
    records = [json.loads(line) for line in (workspace / "registrations.jsonl").read_text().splitlines()]
    assert [(r["version"], r["new_history"]) for r in records] == [(first.version, False), ("1", True), ("2", False)]


def _other_store(tmp_path, monkeypatch, name: str) -> str:
    """MLFLOW_TRACKING_URI on a new, empty store (mlflow.db deleted, or another tracking URI), put back after;
    returns its URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / name}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow's process-wide URIs: put back after the test, for the tests that share the session's store.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    return uri


def test_another_store_with_a_model_of_the_same_name_and_as_many_versions_is_refused(workspace, tmp_path,
                                                                                     monkeypatch):
    from segflow.errors import SegflowError

    first = register_version(workspace, "twin-name", 0.50)
    recorded = json.loads((workspace / "registrations.jsonl").read_text().splitlines()[-1])
    stored = MlflowClient().get_model_version("twin-name", first.version)
    assert (recorded["run_id"], recorded["created"]) == (stored.run_id, str(stored.creation_timestamp))
    uri = _other_store(tmp_path, monkeypatch, "twin-mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("twin-name")  # someone else's model, as many versions
    for _ in range(int(first.version)):
        client.create_model_version("twin-name", str(tmp_path / "elsewhere"))
    with pytest.raises(SegflowError, match=(
            rf"registered twin-name v{first.version} on .* \(training run {stored.run_id}, created {stored.creation_timestamp}\), but "
            rf"v{first.version} in the model registry at sqlite:///.*twin-mlflow.db is another model")):
        register_version(workspace, "twin-name", 0.60)
    assert "champion" not in client.get_registered_model("twin-name").aliases


def test_a_cut_short_line_of_the_registrations_record_is_named_with_its_number(workspace):
    from segflow.errors import SegflowError

    register_version(workspace, "cut-record", 0.50)
    record = workspace / "registrations.jsonl"
    lines = record.read_text().splitlines()
    record.write_text("\n".join(lines) + "\n" + lines[-1][:25])  # a write cut short by a full disk
    with pytest.raises(SegflowError, match=rf"registrations.jsonl: line {len(lines) + 1} is not a whole JSON record"):
        register_version(workspace, "cut-record", 0.60)
    record.write_text("\n".join(lines) + "\n")


def test_candidates_are_ranked_on_val_and_the_teacher_is_one_of_them(workspace):
    import shutil

    shutil.copytree(workspace / "models" / ARCH, workspace / "models" / "teacher")
    # The architecture is better on test, the teacher on val: val chooses, test only reports.
    write_scores(workspace / "evaluation", ARCH, arch=ARCH, val=0.50, test=0.70)
    write_scores(workspace / "evaluation", "teacher", arch=ARCH, val=0.60, test=0.55)
    params = parse_params({"train": {"archs": [ARCH]}, "register": {"model_name": "by-val"}})
    decision = register_stage(params, candidates=[ARCH, "teacher"], evaluation_dir=workspace / "evaluation",
                        models_dir=workspace / "models", data_dir=workspace / "data",
                        splits_csv=workspace / "splits.csv", out_file=workspace / "decision.json")
    assert (decision.candidate, decision.score, decision.promoted) == ("teacher", 0.55, True)
    version = MlflowClient().get_model_version("by-val", decision.version)
    assert version.tags["candidate"] == "teacher" and version.tags["val_miou"] == "0.6"


@pytest.mark.parametrize("scores, reason", [
    ({"test": 0.40, "predicted": ("background",)}, "it predicts only background on the test images"),
    ({"test": 0.40, "baseline": 0.38}, "does not beat predicting 'background' everywhere (0.3800)"),
    ({"test": 0.08}, "test miou 0.0800 is below register.min_score 0.1"),
])
def test_a_model_below_the_floor_never_becomes_champion_not_even_the_first(workspace, scores, reason):
    from segflow.errors import SegflowError
    from segflow.registry.mlflow_registry import PromotionRefused

    name = f"floor-{abs(hash(reason)) % 10**6}"
    write_scores(workspace / "evaluation", ARCH, arch=ARCH, **scores)
    params = parse_params({"train": {"archs": [ARCH]}, "register": {"model_name": name}})
    decision = register_stage(params, candidates=[ARCH], evaluation_dir=workspace / "evaluation",
                        models_dir=workspace / "models", data_dir=workspace / "data",
                        splits_csv=workspace / "splits.csv", out_file=workspace / "decision.json")
    assert not decision.promoted and reason in decision.reason and "below the floor" in decision.reason
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(name, "challenger").version) == decision.version
    with pytest.raises(MlflowException, match="champion"):
        client.get_model_version_by_alias(name, "champion")
    assert reason in client.get_model_version(name, decision.version).tags["below_floor"]
    refused = promote(params, name, decision.version, data_dir=workspace / "data",
                      splits_csv=workspace / "splits.csv")  # the gate by hand refuses it too
    assert not refused.promoted and "below the floor" in refused.reason
    assert issubclass(PromotionRefused, SegflowError)


def test_the_version_comes_from_the_training_run_and_the_pipeline_run_shows_why(workspace):
    import mlflow

    from segflow.registry import tracking

    params = parse_params({"train": {"archs": [ARCH]}, "register": {"model_name": "why"}})
    write_scores(workspace / "evaluation", ARCH, arch=ARCH, test=0.5)
    client = MlflowClient()
    with tracking.pipeline_run(params.mlflow) as pipeline:
        training = client.create_run(pipeline.info.experiment_id, run_name=ARCH).info.run_id
        card_file = workspace / "models" / ARCH / "model.json"
        card = json.loads(card_file.read_text())
        card_file.write_text(json.dumps({**card, "extra": {tracking.TRAINING_RUN_KEY: training}}))
        decision = register_stage(params, candidates=[ARCH], evaluation_dir=workspace / "evaluation",
                            models_dir=workspace / "models", data_dir=workspace / "data",
                            splits_csv=workspace / "splits.csv", out_file=workspace / "decision.json")
    version = client.get_model_version("why", decision.version)
    assert version.run_id == training == version.tags["source_run_id"]  # the UI links the version to its training
    assert version.description.startswith(f"**{ARCH}** is the best of 1 candidates ({ARCH}) on val miou: 0.5000")
    assert "promoted to champion: no champion yet" in version.description
    trained = client.get_run(training)  # its page: the logged model, and why it was registered
    assert trained.outputs.model_outputs and trained.data.tags["mlflow.note.content"] == version.description
    assert "registration/champion_history.md" in {f.path for f in client.list_artifacts(training, "registration")}

    parent = client.get_run(pipeline.info.run_id)
    assert parent.data.tags["segflow.chosen"] == ARCH and parent.data.tags["segflow.champion_before"] == "none"
    assert parent.data.tags["segflow.champion_after"] == f"v{decision.version}"
    assert parent.data.tags["mlflow.note.content"] == version.description
    assert parent.data.metrics["challenger_miou"] == 0.5
    summary = {f.path for f in client.list_artifacts(pipeline.info.run_id, "summary")}
    assert summary == {"summary/decision.json", "summary/champion_history.md"}
    history = Path(mlflow.artifacts.download_artifacts(run_id=pipeline.info.run_id,
                                                       artifact_path="summary/champion_history.md")).read_text()
    assert f"| v{decision.version} | promote | no champion yet |" in history
    register_run = client.get_run(version.tags["register_run_id"])
    assert register_run.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert "champion_history.md" in {f.path for f in client.list_artifacts(register_run.info.run_id)}
