"""Operations on a registered model after ``segflow register``: list its versions, promote one to champion
(through the same gate as ``register``, or forced with a recorded reason), roll the champion back.

Every champion change holds :func:`segflow.register.promotion_lock` and appends to ``champion_history``;
a version whose model files are gone from the artifact store is never made champion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from segflow import tracking
from segflow.config import Params
from segflow.data import load_samples
from segflow.errors import SegflowError
from segflow.evaluate import split_fingerprint
from segflow.register import (
    Decision, PromotionRefused, champion_history, champion_lineage, champion_version, gate_and_promote,
    history_entry, missing_artifacts, promotion_lock, record_champion, score_on, version_number,
)

FORCED_REASON_TAG = "forced_promotion_reason"


def connect(params: Params) -> MlflowClient:
    """A client on the store ``segflow register`` writes to (also for the ``models:/`` downloads)."""
    uri = tracking.tracking_uri(params.mlflow)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException:
        raise SegflowError(f"no registered model named '{name}' in {mlflow.get_registry_uri()}.") from None


def model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    registered_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise SegflowError(f"{name} has no version '{version}' (see `segflow models list {name}`).") from None


@dataclass
class VersionRow:
    version: str
    aliases: str
    arch: str
    score: str
    test_data_hash: str
    git_commit: str
    created: str


def list_versions(client: MlflowClient, name: str, metric: str) -> list[VersionRow]:
    """Every version of ``name``, oldest first, with what the gate looks at."""
    aliases: dict[str, list[str]] = {}
    for alias, version in registered_model(client, name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return [
        VersionRow(
            version=str(v.version), aliases=",".join(sorted(aliases.get(str(v.version), []))) or "-",
            arch=v.tags.get("arch", "-"), score=v.tags.get(f"test_{metric}", "-"),
            test_data_hash=v.tags.get("test_data_hash", "-")[:12], git_commit=v.tags.get("git_commit", "-")[:12],
            created=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.creation_timestamp / 1000)),
        )
        for v in versions
    ]


def format_versions(rows: list[VersionRow], metric: str) -> str:
    header = VersionRow("version", "aliases", "arch", f"test {metric}", "test_data_hash", "git commit", "created (UTC)")
    table = [list(vars(row).values()) for row in [header, *rows]]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in table)


def require_artifacts(name: str, version: str) -> None:
    if missing := missing_artifacts(name, version):
        raise PromotionRefused(
            f"{name} v{version} cannot become champion: its model artifact is incomplete, missing "
            f"{', '.join(missing)} (deleted from the artifact store?). Register a new version instead."
        )


def promote_version(
    params: Params, name: str, version: str, *, data_dir: Path, splits_csv: Path,
    force: bool = False, reason: str | None = None,
) -> Decision:
    """Make ``version`` the champion if it wins the gate on the current test split, or unconditionally with
    ``force`` (``reason`` is then required and recorded on the version and in the history)."""
    if force and not (reason and reason.strip()):
        raise SegflowError("segflow promote: --force needs --reason TEXT (recorded in the champion history).")
    client = connect(params)
    candidate = model_version(client, name, version)
    require_artifacts(name, version)
    if force:
        return _force(client, candidate, reason.strip())
    samples = load_samples(data_dir, splits_csv, "test")
    if not samples:
        raise SegflowError(f"{splits_csv}: no test images to gate v{version} on; run the split stage first.")
    test_data_hash = split_fingerprint(samples)
    score = score_on(params, candidate, test_data_hash, data_dir, splits_csv)
    return gate_and_promote(params, client, candidate, score, test_data_hash, data_dir, splits_csv)


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


def rollback(params: Params, name: str) -> tuple[str | None, str]:
    """Point ``champion`` back at the champion before the current one (per the history); returns (from, to)."""
    client = connect(params)
    registered_model(client, name)
    with promotion_lock(client, name):
        lineage = champion_lineage(champion_history(client, name))
        if len(lineage) < 2:
            raise SegflowError(f"{name}: no previous champion to roll back to "
                               f"(champion history: {', '.join('v' + v for v in lineage) or 'empty'}).")
        current, target = champion_version(client, name), lineage[-2]
        require_artifacts(name, target)
        record_champion(client, name, history_entry(target, "rollback", f"rollback from v{lineage[-1]}", current))
    return version_number(current), target

