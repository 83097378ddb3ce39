"""The Model Registry's state and the operations on it: the ``champion`` alias and its history, the lock every
champion change holds, and the commands run after ``segflow register``: list a model's versions, promote one
to champion (through the same gate as ``register``, or forced with a recorded reason), roll the champion back.

Every champion change holds :func:`promotion_lock` and appends to ``champion_history``; a version whose model
files are gone from the artifact store is never made champion. Only gating loads torch (to score models):
listing, forcing and rolling back stay quick.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from segflow import CARD_FILE, WEIGHTS_FILE, tracking
from segflow.config import Params
from segflow.errors import SegflowError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
MLMODEL_FILE = "MLmodel"
# How long to wait for another process's promotion; the lock is held for a handful of registry calls.
LOCK_WAIT_S = 60.0
# Does-not-exist too: the holder released the lock between our failed insert and MLflow's look-up of it.
_LOCK_TAKEN = (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST))
FORCED_REASON_TAG = "forced_promotion_reason"


class PromotionRefused(SegflowError):
    """The gate (or the registry's state) refused a promotion; the champion is unchanged."""

    exit_code = 1


@dataclass
class Decision:
    model_name: str
    version: str
    arch: str
    score: float | None
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_number(version: ModelVersion | None) -> str | None:
    return str(version.version) if version is not None else None


def champion_history(client: MlflowClient, name: str) -> list[dict]:
    """The champion changes, oldest first. The history is written before the alias (record_champion), so a
    failure between the two leaves entries after the current champion's last one that never took effect:
    they are left out (when the champion is in the history at all; otherwise it is returned as stored)."""
    history = json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))
    champion = version_number(champion_version(client, name))
    effective = [i for i, entry in enumerate(history) if entry["version"] == champion]
    return history[: effective[-1] + 1] if effective else history


def champion_lineage(history: list[dict]) -> list[str]:
    """The champions still to roll back through, oldest first: a promotion pushes, a rollback pops."""
    lineage: list[str] = []
    for entry in history:
        if entry.get("action") == "rollback":
            del lineage[-1:]
        else:
            lineage.append(entry["version"])
    return lineage


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def history_entry(version: str, action: str, reason: str, previous: ModelVersion | None) -> dict:
    return {
        "version": str(version), "at": _utc_now(), "action": action,
        "reason": reason, "previous": version_number(previous),
    }


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Only one process at a time changes ``name``'s champion, whatever the store (SQLite or a server).

    MLflow has no transactions and no compare-and-set on tags or aliases, but creating a registered model
    whose name is taken fails atomically (a unique key in the store's database). So the lock is a registered
    model ``NAME.promotion-lock`` that exists while held. A process killed while holding it leaves it behind;
    the next promotion then fails after ``LOCK_WAIT_S``, naming it, rather than guessing that it is stale.
    """
    lock_name = f"{name}.promotion-lock"
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            client.create_registered_model(lock_name, tags={"holder": holder, "since": _utc_now()},
                                           description=f"segflow: a promotion of {name} is in progress")
            break
        except MlflowException as exc:
            if exc.error_code not in _LOCK_TAKEN:
                raise
        if time.monotonic() > deadline:
            with contextlib.suppress(MlflowException):
                holder = client.get_registered_model(lock_name).tags.get("holder", "unknown")
            raise SegflowError(
                f"{name}: another promotion ({holder}) has held the registry lock for over {LOCK_WAIT_S:.0f} s. "
                f"If no segflow promotion is running, delete the registered model '{lock_name}' and try again."
            )
        time.sleep(0.1)
    try:
        yield
    finally:
        client.delete_registered_model(lock_name)


def record_champion(client: MlflowClient, name: str, entry: dict) -> None:
    """Point ``champion`` at ``entry["version"]`` and append ``entry`` to the history (hold the lock)."""
    history = champion_history(client, name) + [entry]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, entry["version"])
    # Read both back: a writer that bypassed the lock (UI, another tool) must not leave them silently apart.
    champion = champion_version(client, name)
    if champion is None or str(champion.version) != entry["version"] or champion_history(client, name)[-1] != entry:
        raise SegflowError(
            f"{name}: the champion alias or '{HISTORY_TAG}' changed outside segflow while v{entry['version']} "
            "was being promoted; check both in the MLflow UI before promoting again."
        )


def missing_artifacts(name: str, version: str) -> list[str]:
    """The files the served model needs (MLmodel, the model code, the weights and card) that the artifact
    store no longer has."""
    uri = f"models:/{name}/{version}"
    try:
        repo = get_artifact_repository(uri)
        present = {f.path for f in repo.list_artifacts("")}
    except MlflowException as exc:
        if (unreachable := tracking.unreachable_server_error(exc)) is not None:
            raise unreachable from exc  # the store is down, not the version broken
        raise PromotionRefused(f"{name} v{version}: cannot read its model artifact ({exc.message}).") from None
    if MLMODEL_FILE not in present:
        return [MLMODEL_FILE]
    flavor = Model.load(uri).flavors.get("python_function", {})
    model_dir = flavor.get("artifacts", {}).get("model_dir", {}).get("path")
    if model_dir is None or "model_code_path" not in flavor:
        raise SegflowError(f"{name} v{version} is not a segflow model (no model code and model_dir in its MLmodel).")
    present |= {f.path for f in repo.list_artifacts(model_dir)}
    needed = [Path(flavor["model_code_path"]).name, f"{model_dir}/{WEIGHTS_FILE}", f"{model_dir}/{CARD_FILE}"]
    return [path for path in needed if path not in present]


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
    from segflow.register import gate_on_test_split  # scoring needs torch: loaded only when gating

    return gate_on_test_split(params, client, candidate, data_dir, splits_csv)


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

