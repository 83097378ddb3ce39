"""Register the run's best model in the MLflow Model Registry and promote it through a floor and a gate.

The candidates are every model the run trained and evaluated, the teacher included; the one with the best val
score (``register.metric``, served inference settings) is registered. The new version always gets the alias
``challenger``; it becomes ``champion`` only when it clears the floor (segflow.inference.scores.floor_failures: more than
one class predicted, above the majority-class baseline and ``register.min_score``; the first champion included)
and its test score beats the champion's by ``register.margin`` on the same test data (a version scored on other
test data is re-scored on the current test split). Every change of champion is appended to the registered
model's ``champion_history`` tag, under a lock (see :func:`segflow.registry.mlflow_registry.promotion_lock`), so the alias and
the history agree. A version is created with every tag the gate reads; registering the same model again (same
weights, score and test data) reuses its version, so a registration cut short by a tracking-server failure is
finished by the next one.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

import segflow
from segflow import CARD_FILE, WEIGHTS_FILE
from segflow.config import InferenceParams, MlflowParams, RegisterParams
from segflow.data.fingerprint import file_sha256
from segflow.errors import SegflowError
from segflow.fsutil import atomic_write_json
from segflow.inference.card import INFERENCE_KEY, read_card
from segflow.inference.scores import floor_failures, rank_candidates, read_scores, test_score
from segflow.registry import tracking
from segflow.registry.mlflow_registry import (
    CHALLENGER,
    FILES_METADATA_KEY,
    FLOOR_TAG,
    LOADER_MODULE,
    MLMODEL_FILE,
    MLMODEL_TAG,
    REGISTRATIONS_FILE,
    WEIGHTS_TAG,
    Decision,
    champion_history,
    champion_version,
    check_history,
    missing_artifacts,
    record_registration,
    version_number,
)
from segflow.registry.promotion import TestSplit, gate_and_promote

log = logging.getLogger(__name__)

# No input schema: the input is one image, an HxWx3 array or an encoded file (bytes, or base64 text in JSON), which
# no single MLflow schema describes; segflow.registry.pyfunc_model.decode_image checks it. The output is the HxW mask, or
# with params {"output": "probabilities"} KxHxW float32 (MLflow does not enforce output schemas).
SIGNATURE = ModelSignature(
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
    params=ParamSchema([ParamSpec("output", "string", "mask")]),
)
# What the served model needs; listing it explicitly also spares MLflow a slow dependency inference.
PIP_REQUIREMENTS = [
    f"segflow=={segflow.__version__}", "torch==2.14.1", "torchvision==0.29.1", "segmentation-models-pytorch==0.6.0",
    "timm==1.0.31", "safetensors==0.8.0", "numpy==2.4.6", "pillow==13.0.0", "mlflow==3.17.2",
]


def log_served_model(model_dir: Path, weights_sha256: str, inference: InferenceParams, run_id: str) -> ModelInfo:
    """Log what the served model needs from ``model_dir`` as an MLflow model of the run ``run_id`` (its training
    run: the registered version's source run): its weights, and its card with the ``inference`` settings it was
    evaluated with (``extra["inference"]``, used by segflow.registry.pyfunc_model and ``segflow predict``). Snapshots, EMA
    and last weights stay in the training run.

    The model's code is the installed segflow's (LOADER_MODULE): the artifact store holds data only. The MLmodel's
    metadata records the SHA-256 of the weights (``weights_sha256``, as the registry tags them) and of the card."""
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp) / model_dir.name  # the folder's name is kept: data/<name> in the artifact
        served.mkdir()
        shutil.copyfile(model_dir / WEIGHTS_FILE, served / WEIGHTS_FILE)
        card = read_card(model_dir)
        card = replace(card, extra={**card.extra, INFERENCE_KEY: inference.model_dump(mode="json")})
        atomic_write_json(served / CARD_FILE, asdict(card))
        # mlflow.pyfunc.log_model with a run other than the active one (the register stage's).
        return Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            name="model",
            loader_module=LOADER_MODULE,
            data_path=str(served),
            signature=SIGNATURE,
            pip_requirements=PIP_REQUIREMENTS,
            metadata={FILES_METADATA_KEY: {WEIGHTS_FILE: weights_sha256, CARD_FILE: file_sha256(served / CARD_FILE)}},
        )


def _champions(decision: Decision) -> tuple[str, str]:
    """The champion before and after ``decision``, as ``vN`` or ``none``."""
    after = decision.version if decision.promoted else decision.champion_version
    return tuple("none" if version is None else f"v{version}" for version in (decision.champion_version, after))


def decision_text(decision: Decision, candidates: list[str], metric: str, val_score: float) -> str:
    """Why this version, and what the registry did with it, in Markdown: the description of the version and of
    the runs that show the decision."""
    before, after = _champions(decision)
    if decision.champion_score is not None:
        before += f" (test {metric} {decision.champion_score:.4f})"
    outcome = "promoted to champion" if decision.promoted else "stays challenger"
    model = decision.candidate if decision.candidate == decision.arch else f"{decision.candidate} ({decision.arch})"
    return (f"**{model}** is the best of {len(candidates)} candidates "
            f"({', '.join(candidates)}) on val {metric}: {val_score:.4f}; test {metric} {decision.score:.4f}.\n\n"
            f"**{decision.model_name} v{decision.version}** {outcome}: {decision.reason}.\n\n"
            f"**Champion** before: {before}; after: {after}.")


def history_table(history: list[dict]) -> str:
    """The champion history as a Markdown table, newest first."""
    if not history:
        return "No version has been champion yet.\n"
    lines = ["| version | action | reason | at (UTC) | previous champion |", "|---|---|---|---|---|"]
    for entry in reversed(history):
        previous = "none" if entry.get("previous") is None else f"v{entry['previous']}"
        reason = entry["reason"].replace("|", "\\|")
        lines.append(f"| v{entry['version']} | {entry['action']} | {reason} | {entry['at']} | {previous} |")
    return "\n".join(lines) + "\n"


def log_decision(
    client: MlflowClient, run_id: str, folder: str | None, decision: Decision, description: str,
    scores: dict[str, float], decision_file: Path, history: list[dict],
) -> None:
    """The decision on ``run_id``: its ``description`` and tags, the chosen model's ``scores`` as metrics, and
    the decision file and champion history as artifacts in ``folder``."""
    before, after = _champions(decision)
    tags = {MLFLOW_RUN_NOTE: description, "segflow.chosen": str(decision.candidate),
            "segflow.registered": f"{decision.model_name} v{decision.version}",
            "segflow.promoted": str(decision.promoted), "segflow.decision": decision.reason,
            "segflow.champion_before": before, "segflow.champion_after": after}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    mlflow.log_metrics(scores, run_id=run_id)
    client.log_artifact(run_id, str(decision_file), folder)
    client.log_text(run_id, history_table(history), posixpath.join(folder or "", "champion_history.md"))


def stored_mlmodel_sha256(model_info: ModelInfo) -> str:
    """The SHA-256 of the logged model's MLmodel as the artifact store holds it (what loads check it against)."""
    with tempfile.TemporaryDirectory() as tmp:
        return file_sha256(Path(mlflow.artifacts.download_artifacts(
            f"{model_info.artifact_path}/{MLMODEL_FILE}", dst_path=tmp)))


def earlier_registration(client: MlflowClient, name: str, identity: dict[str, str]) -> ModelVersion | None:
    """The newest version of ``name`` registered with ``identity`` before whose files are all in the store.

    Registering the same model again reuses it rather than adding a duplicate: that is how a register that
    failed after creating its version (the tracking server went away), leaving it without the challenger
    alias and ungated, is finished. A version registered by an older segflow (no MLmodel hash: its model code
    is in the artifact store) is never reused."""
    query = " and ".join([f"name = '{name}'", *(f"tags.`{key}` = '{value}'" for key, value in identity.items())])
    for version in sorted(client.search_model_versions(query), key=lambda v: int(v.version), reverse=True):
        if MLMODEL_TAG in version.tags and not missing_artifacts(name, str(version.version)):
            return version
    return None


def register_version(
    cfg: RegisterParams, register_run_id: str, model_dir: Path, identity: dict[str, str], inference: InferenceParams,
    tags: dict[str, str],
) -> ModelVersion:
    """A new version of ``cfg.model_name`` from ``model_dir``, served with ``inference``, its source run the model's
    training run, tagged with its ``identity`` and ``tags``."""
    # A model folder from before segflow recorded its training run, or from another store: this run.
    source_run = tracking.training_run(read_card(model_dir).extra) or register_run_id
    model_info = log_served_model(model_dir, identity[WEIGHTS_TAG], inference, source_run)
    # Every tag the gate reads is created with the version, in one transaction of the store: no version is ever
    # seen without them. The MLmodel's and weights' hashes live in the registry, which the artifact store cannot
    # change: loads check the downloaded files against them.
    tags = {**identity, MLMODEL_TAG: stored_mlmodel_sha256(model_info), **tags,
            "git_commit": tracking.git_commit() or "unknown", "source_run_id": source_run,
            "register_run_id": register_run_id}
    return mlflow.register_model(model_info.model_uri, cfg.model_name, tags=tags)


def _decide(
    cfg: RegisterParams, client: MlflowClient, candidate: ModelVersion, chosen: str, best: dict, best_score: float,
    below_floor: list[str], test: TestSplit,
) -> Decision:
    """What becomes of ``candidate`` (the model ``chosen``, its scores ``best``): challenger below the floor,
    already the champion, or what the gate decides."""
    if below_floor:
        return Decision(cfg.model_name, str(candidate.version), best["arch"], best_score,
                        version_number(champion_version(client, cfg.model_name)), None, False,
                        f"{chosen} is below the floor: {'; '.join(below_floor)}", chosen)
    if version_number(champion_version(client, cfg.model_name)) == str(candidate.version):
        return Decision(cfg.model_name, str(candidate.version), best["arch"], best_score,
                        str(candidate.version), best_score, True,
                        "already the champion (an earlier register promoted it)", chosen)
    return gate_and_promote(cfg, client, candidate, best_score, str(best["test"]["data_hash"]), test)


def register(
    cfg: RegisterParams, mlflow_cfg: MlflowParams, test: TestSplit, *, candidates: list[str], evaluation_dir: Path,
    models_dir: Path, out_file: Path, force: bool = False,
) -> Decision:
    """Register the best of ``candidates`` (every model the run trained and evaluated, the teacher included), ranked
    on val by ``register.metric`` (segflow.inference.scores); promote it if it clears the floor and wins the gate on test.

    Each registration is appended to ``registrations.jsonl`` beside ``out_file``; a registry that lacks versions
    recorded there is refused (:func:`segflow.registry.mlflow_registry.check_history`) unless ``force`` starts a new history."""
    scores = {name: read_scores(evaluation_dir, name) for name in candidates}
    chosen, val_score = rank_candidates(scores, cfg.metric)[0]
    best = scores[chosen]
    best_score = test_score(best, cfg.metric, chosen)
    below_floor = floor_failures(best, cfg)

    weights = Path(models_dir) / chosen / WEIGHTS_FILE
    if not weights.is_file():
        raise SegflowError(f"{weights}: no trained model for {chosen}; run the train stage first.")
    # Served exactly as evaluated: the settings the evaluate stage scored it with, whatever params say now.
    inference = InferenceParams.model_validate(best["inference"])
    # What makes two registrations the same: these weights, scored this way on this test data.
    identity = {
        "arch": best["arch"], f"test_{cfg.metric}": str(best_score), "test_data_hash": str(best["test"]["data_hash"]),
        WEIGHTS_TAG: file_sha256(weights),
        "inference_sha256": hashlib.sha256(inference.model_dump_json().encode()).hexdigest(),
    }
    with tracking.stage_run(mlflow_cfg, "register") as run:
        client = MlflowClient()
        record_file = Path(out_file).with_name(REGISTRATIONS_FILE)
        if not force:
            check_history(client, cfg.model_name, record_file)
        candidate = earlier_registration(client, cfg.model_name, identity)
        if candidate is None:
            tags = {"candidate": chosen, f"val_{cfg.metric}": str(val_score),
                    **({FLOOR_TAG: "; ".join(below_floor)} if below_floor else {})}
            candidate = register_version(cfg, run.info.run_id, Path(models_dir) / chosen, identity, inference, tags)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, candidate.version)
        decision = _decide(cfg, client, candidate, chosen, best, best_score, below_floor, test)
        atomic_write_json(out_file, asdict(decision))
        # Why, wherever a person looks: the version, this run, the pipeline run, the model's training run.
        description = decision_text(decision, candidates, cfg.metric, val_score)
        client.update_model_version(cfg.model_name, candidate.version, description=description)
        scores = {f"challenger_{cfg.metric}": best_score, f"challenger_val_{cfg.metric}": val_score}
        history = champion_history(client, cfg.model_name)
        shown_on = [(run.info.run_id, None), (tracking.parent_run_id(run), "summary")]
        if candidate.run_id != run.info.run_id:
            shown_on.append((candidate.run_id, "registration"))
        for run_id, folder in shown_on:
            if run_id is not None:
                log_decision(client, run_id, folder, decision, description, scores, Path(out_file), history)
        record_registration(record_file, decision, new_history=force, version=candidate)
    log.info("registered %s v%s (%s): %s", cfg.model_name, decision.version, chosen, decision.reason)
    return decision
