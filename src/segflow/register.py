"""Register the best evaluated architecture in the MLflow Model Registry and promote it through a gate.

The new version always gets the alias ``challenger``; it becomes ``champion`` only when its test score beats
the champion's by ``register.margin`` on the same test data (a version scored on other test data is
re-scored on the current test split). Every change of champion is appended to the registered model's
``champion_history`` tag, under a lock (see :func:`segflow.registry.promotion_lock`), so the alias and the history agree.
A version is created with every tag the gate reads; registering the same model again (same weights, score
and test data) reuses its version, so a registration cut short by a tracking-server failure is finished by
the next one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import Schema, TensorSpec
from torch.utils.data import DataLoader

import segflow
from segflow import CARD_FILE, WEIGHTS_FILE, tracking
from segflow.config import Params
from segflow.data import SegmentationDataset, load_samples, pad_collate
from segflow.errors import SegflowError
from segflow.evaluate import compare_metrics, confusion_over, split_fingerprint
from segflow.fingerprint import file_sha256
from segflow.fsutil import atomic_write_json
from segflow.inference import load_model, resolve_model_dir
from segflow.registry import (
    CHALLENGER, FILES_METADATA_KEY, LOADER_MODULE, MLMODEL_FILE, MLMODEL_TAG, REGISTRATIONS_FILE, WEIGHTS_TAG,
    Decision, PromotionRefused, champion_version, check_history, history_entry, missing_artifacts, promotion_lock,
    record_champion, record_registration, version_number,
)

log = logging.getLogger("segflow.register")

# A promotion whose champion changed while it was being gated is gated again against the new one.
GATE_ATTEMPTS = 3
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
)
# What the served model needs; listing it explicitly also spares MLflow a slow dependency inference.
PIP_REQUIREMENTS = [
    f"segflow=={segflow.__version__}", "torch==2.14.1", "torchvision==0.29.1", "segmentation-models-pytorch==0.6.0",
    "timm==1.0.31", "safetensors==0.8.0", "numpy==2.4.6", "pillow==13.0.0", "mlflow==3.17.2",
]


def score_registered_version(params: Params, name: str, version: str, data_dir: Path, splits_csv: Path) -> float:
    """Re-score a registered version on the current test split (its weights, not its old metric)."""
    samples = load_samples(data_dir, splits_csv, "test")
    with resolve_model_dir(f"models:/{name}/{version}") as model_dir:
        model, card = load_model(model_dir)
    loader = DataLoader(SegmentationDataset(samples), batch_size=params.evaluate.batch_size, collate_fn=pad_collate)
    confusion = confusion_over(model, loader, card.num_classes, torch.device("cpu"), params.evaluate.inference,
                               params.train.crop_size)
    return float(confusion.compute()[params.register_.metric])


def score_on(params: Params, version: ModelVersion, test_data_hash: str, data_dir: Path, splits_csv: Path) -> float:
    """``version``'s test score on the data with ``test_data_hash``: its recorded score when it was scored on
    that data, else a fresh one (never a score from another dataset)."""
    recorded = version.tags.get(f"test_{params.register_.metric}")
    if recorded is not None and version.tags.get("test_data_hash") == test_data_hash:
        return float(recorded)
    log.info("v%s was scored on other test data; re-scoring it on the current test split", version.version)
    return score_registered_version(params, version.name, str(version.version), data_dir, splits_csv)


def gate_and_promote(
    params: Params, client: MlflowClient, candidate: ModelVersion, score: float, test_data_hash: str,
    data_dir: Path, splits_csv: Path,
) -> Decision:
    """Promote ``candidate`` (test ``score`` on the data with ``test_data_hash``) if it beats the champion."""
    cfg, name, version = params.register_, candidate.name, str(candidate.version)
    for _ in range(GATE_ATTEMPTS):
        champion = champion_version(client, name)
        champion_score = None
        if champion is None:
            promoted, reason = True, "no champion yet"
        elif str(champion.version) == version:
            raise PromotionRefused(f"{name} v{version} is already the champion.")
        else:
            champion_score = score_on(params, champion, test_data_hash, data_dir, splits_csv)
            promoted = score > champion_score + cfg.margin
            reason = (
                f"{cfg.metric} {score:.4f} {'beats' if promoted else 'does not beat'} champion "
                f"v{champion.version} {champion_score:.4f} by more than margin {cfg.margin}"
            )
        decision = Decision(name, version, candidate.tags.get("arch", "unknown"), score,
                            version_number(champion), champion_score, promoted, reason)
        if not promoted:
            return decision
        with promotion_lock(client, name):
            # Scoring ran outside the lock (it can take minutes); commit only if it gated the current champion.
            if version_number(champion_version(client, name)) == version_number(champion):
                record_champion(client, name, history_entry(version, "promote", reason, champion))
                return decision
        log.info("the champion changed while v%s was gated; gating it again", version)
    raise SegflowError(f"{name}: the champion changed {GATE_ATTEMPTS} times while v{version} was being gated; "
                       "promote it again when the other promotions are done.")


def gate_on_test_split(
    params: Params, client: MlflowClient, candidate: ModelVersion, data_dir: Path, splits_csv: Path
) -> Decision:
    """Gate ``candidate`` (scored again if its recorded score is from other test data) on the current test split."""
    samples = load_samples(data_dir, splits_csv, "test")
    if not samples:
        raise SegflowError(
            f"{splits_csv}: no test images to gate v{candidate.version} on; run the split stage first.")
    test_data_hash = split_fingerprint(samples)
    score = score_on(params, candidate, test_data_hash, data_dir, splits_csv)
    return gate_and_promote(params, client, candidate, score, test_data_hash, data_dir, splits_csv)


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


def register(
    params: Params, *, metrics_dir: Path, models_dir: Path, data_dir: Path, splits_csv: Path, out_file: Path,
    force: bool = False,
) -> Decision:
    """Register the best of ``params.train.archs`` (by ``register.metric``) and apply the promotion gate.

    Each registration is appended to ``registrations.jsonl`` beside ``out_file``; a registry that lacks versions
    recorded there is refused (:func:`segflow.registry.check_history`) unless ``force`` starts a new history."""
    cfg = params.register_
    metrics = {}
    for arch in params.train.archs:
        path = Path(metrics_dir) / f"{arch}.json"
        try:
            metrics[arch] = json.loads(path.read_text())
        except FileNotFoundError:
            raise SegflowError(f"{path}: no evaluation for {arch}; run the evaluate stage first.") from None
    best_arch, best_score = compare_metrics(metrics, cfg.metric)[0]
    best = metrics[best_arch]

    weights = Path(models_dir) / best_arch / WEIGHTS_FILE
    if not weights.is_file():
        raise SegflowError(f"{weights}: no trained model for {best_arch}; run the train stage first.")
    # What makes two registrations the same: these weights, scored this way on this test data.
    identity = {
        "arch": best_arch, f"test_{cfg.metric}": str(best_score), "test_data_hash": str(best["test_data_hash"]),
        WEIGHTS_TAG: file_sha256(weights),
    }
    with tracking.stage_run(params.mlflow, "register") as run:
        client = MlflowClient()
        record_file = Path(out_file).with_name(REGISTRATIONS_FILE)
        if not force:
            check_history(client, cfg.model_name, record_file)
        candidate = earlier_registration(client, cfg.model_name, identity)
        if candidate is None:
            # The model's code is the installed segflow's (LOADER_MODULE): the artifact store holds data only.
            model_dir = Path(models_dir) / best_arch
            model_info = mlflow.pyfunc.log_model(
                name="model",
                loader_module=LOADER_MODULE,
                data_path=str(model_dir),
                signature=SIGNATURE,
                pip_requirements=PIP_REQUIREMENTS,
                metadata={FILES_METADATA_KEY: {WEIGHTS_FILE: identity[WEIGHTS_TAG],
                                               CARD_FILE: file_sha256(model_dir / CARD_FILE)}},
            )
            # Every tag the gate reads is created with the version, in one transaction of the store: no version
            # is ever seen without them. The MLmodel's and weights' hashes live in the registry, which the
            # artifact store cannot change: loads check the downloaded files against them.
            tags = {**identity, MLMODEL_TAG: stored_mlmodel_sha256(model_info),
                    "git_commit": tracking.git_commit() or "unknown", "source_run_id": run.info.run_id}
            candidate = mlflow.register_model(model_info.model_uri, cfg.model_name, tags=tags)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, candidate.version)
        mlflow.log_metrics({f"challenger_{cfg.metric}": best_score})
        if version_number(champion_version(client, cfg.model_name)) == str(candidate.version):
            decision = Decision(cfg.model_name, str(candidate.version), best_arch, best_score, str(candidate.version),
                                best_score, True, "already the champion (an earlier register promoted it)")
        else:
            decision = gate_and_promote(params, client, candidate, best_score, str(best["test_data_hash"]),
                                        data_dir, splits_csv)
        mlflow.set_tags({"segflow.promoted": str(decision.promoted), "segflow.decision": decision.reason})
        atomic_write_json(out_file, asdict(decision))
        mlflow.log_artifact(str(out_file))
        record_registration(record_file, decision, new_history=force)
    log.info("registered %s v%s (%s): %s", cfg.model_name, decision.version, best_arch, decision.reason)
    return decision
