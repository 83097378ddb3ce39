"""The promotion gate: a version becomes ``champion`` only if its test score beats the champion's by
``register.margin`` on the same test data (a version scored on other test data is re-scored on the current test
split first), and never when it is below the floor. ``segflow register`` and ``segflow promote`` both go through
it; the registry's state and its lock are :mod:`segflow.registry.mlflow_registry`'s. Scoring loads torch: only on a re-score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from segflow.config import InferenceParams, MlflowParams, RegisterParams
from segflow.errors import SegflowError
from segflow.registry.mlflow_registry import (
    FLOOR_TAG,
    FORCED_REASON_TAG,
    Decision,
    PromotionRefused,
    champion_version,
    connect,
    history_entry,
    model_version,
    promotion_lock,
    record_champion,
    require_intact,
    version_number,
)

log = logging.getLogger(__name__)

# A promotion whose champion changed while it was being gated is gated again against the new one.
GATE_ATTEMPTS = 3


@dataclass(frozen=True)
class TestSplit:
    """The current test split and how a version is re-scored on it, as evaluation predicts."""

    data_dir: Path
    splits_csv: Path
    batch_size: int               # evaluate.batch_size
    inference: InferenceParams    # evaluate.inference: for versions registered without their own settings


def score_registered_version(name: str, version: str, metric: str, test: TestSplit) -> float:
    """Re-score a registered version on the current test split (its weights and the inference settings it is
    served with, not its old metric)."""
    import torch
    from torch.utils.data import DataLoader

    from segflow.data.datasets import SegmentationDataset, load_samples, pad_collate
    from segflow.inference.card import registered_inference
    from segflow.inference.metrics import confusion_over, labeled_scores
    from segflow.inference.predictor import load_model, resolved_inference
    from segflow.registry.model_source import resolve_model_dir

    samples = load_samples(test.data_dir, test.splits_csv, "test")
    with resolve_model_dir(f"models:/{name}/{version}") as model_dir:
        model, card = load_model(model_dir)
        # Older versions: params, the window from the card.
        inference = registered_inference(card, model_dir) or resolved_inference(test.inference, card, model_dir)
    loader = DataLoader(SegmentationDataset(samples), batch_size=test.batch_size, collate_fn=pad_collate)
    confusion = confusion_over(model, loader, card.num_classes, torch.device("cpu"), inference)
    return float(labeled_scores(confusion, test.splits_csv, "test")[metric])


def score_on(version: ModelVersion, metric: str, test_data_hash: str, test: TestSplit) -> float:
    """``version``'s test score on the data with ``test_data_hash``: its recorded score when it was scored on
    that data, else a fresh one (never a score from another dataset)."""
    recorded = version.tags.get(f"test_{metric}")
    if recorded is not None and version.tags.get("test_data_hash") == test_data_hash:
        return float(recorded)
    log.info("v%s was scored on other test data; re-scoring it on the current test split", version.version)
    return score_registered_version(version.name, str(version.version), metric, test)


def gate_and_promote(
    cfg: RegisterParams, client: MlflowClient, candidate: ModelVersion, score: float, test_data_hash: str,
    test: TestSplit,
) -> Decision:
    """Promote ``candidate`` (test ``score`` on the data with ``test_data_hash``) if it beats the champion."""
    name, version = candidate.name, str(candidate.version)
    if below_floor := candidate.tags.get(FLOOR_TAG):
        return Decision(name, version, candidate.tags.get("arch", "unknown"), score,
                        version_number(champion_version(client, name)), None, False,
                        f"below the floor: {below_floor}", candidate.tags.get("candidate"))
    for _ in range(GATE_ATTEMPTS):
        champion = champion_version(client, name)
        champion_score = None
        if champion is None:
            promoted, reason = True, "no champion yet"
        elif str(champion.version) == version:
            raise PromotionRefused(f"{name} v{version} is already the champion.")
        else:
            champion_score = score_on(champion, cfg.metric, test_data_hash, test)
            promoted = score > champion_score + cfg.margin
            reason = (
                f"{cfg.metric} {score:.4f} {'beats' if promoted else 'does not beat'} champion "
                f"v{champion.version} {champion_score:.4f} by more than margin {cfg.margin}"
            )
        decision = Decision(name, version, candidate.tags.get("arch", "unknown"), score,
                            version_number(champion), champion_score, promoted, reason,
                            candidate.tags.get("candidate"))
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


def promote_version(
    name: str, version: str, *, register: RegisterParams, mlflow_cfg: MlflowParams, test: TestSplit,
    force: bool = False, reason: str | None = None,
) -> Decision:
    """Make ``version`` the champion if it wins the gate on the current test split, or unconditionally with
    ``force`` (``reason`` is then required and recorded on the version and in the history)."""
    if force and not (reason and reason.strip()):
        raise SegflowError("segflow promote: --force needs --reason TEXT (recorded in the champion history).")
    client = connect(mlflow_cfg)
    candidate = model_version(client, name, version)
    require_intact(name, version)
    if force:
        return _force(client, candidate, reason.strip())
    from segflow.data.datasets import load_samples
    from segflow.inference.metrics import split_fingerprint

    samples = load_samples(test.data_dir, test.splits_csv, "test")
    if not samples:
        raise SegflowError(
            f"{test.splits_csv}: no test images to gate v{candidate.version} on; run the split stage first.")
    test_data_hash = split_fingerprint(samples)
    score = score_on(candidate, register.metric, test_data_hash, test)
    return gate_and_promote(register, client, candidate, score, test_data_hash, test)


def _force(client: MlflowClient, candidate: ModelVersion, reason: str) -> Decision:
    name, version = candidate.name, str(candidate.version)
    with promotion_lock(client, name):
        champion = champion_version(client, name)
        if version_number(champion) == version:
            raise PromotionRefused(f"{name} v{version} is already the champion.")
        client.set_model_version_tag(name, version, FORCED_REASON_TAG, reason)
        record_champion(client, name, history_entry(version, "forced", reason, champion))
    return Decision(name, version, candidate.tags.get("arch", "unknown"), None,
                    version_number(champion), None, True, f"forced: {reason}")
