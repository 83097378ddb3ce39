"""The Model Registry's state and the operations on it: the ``champion`` alias and its history, the lock every
champion change holds, and the commands run after ``segflow register``: list a model's versions, promote one
to champion (through the same gate as ``register``, or forced with a recorded reason), roll the champion back.

Every champion change holds :func:`promotion_lock` and appends to ``champion_history``; a version whose model
files are gone from the artifact store is never made champion. The gate itself is :mod:`segflow.registry.promotion`'s:
this module loads no torch, so listing, forcing and rolling back stay quick.

A version's files are checked against the registry, not against themselves: registering tags the version with
the SHA-256 of its MLmodel and weights, and :func:`download_registered_model` (every segflow load of a
``models:/`` URI) refuses a download that does not match, so write access to the artifact store alone cannot
change what segflow loads. See :mod:`segflow.registry.pyfunc_model` for what loading through MLflow itself checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.utils.models import get_model_name_and_version

from segflow import CARD_FILE, WEIGHTS_FILE
from segflow.config import MlflowParams
from segflow.data.fingerprint import file_sha256
from segflow.errors import VALIDATION_FAILED, SegflowError, shown
from segflow.registry import tracking

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
MLMODEL_FILE = "MLmodel"
# How long to wait for another process's promotion; the lock is held for a handful of registry calls.
LOCK_WAIT_S = 60.0
# Does-not-exist too: the holder released the lock between our failed insert and MLflow's look-up of it.
_LOCK_TAKEN = (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(RESOURCE_DOES_NOT_EXIST))
FORCED_REASON_TAG = "forced_promotion_reason"
FLOOR_TAG = "below_floor"  # why a version may never be champion (segflow.inference.scores.floor_failures)
# The module MLflow imports to load a registered model (its ``_load_pyfunc``), from the installed segflow
# package: the artifact store holds no code.
LOADER_MODULE = "segflow.registry.pyfunc_model"
WEIGHTS_TAG = "weights_sha256"
MLMODEL_TAG = "mlmodel_sha256"
# MLmodel metadata: {file name: SHA-256} of the weights and card in the model's data folder.
FILES_METADATA_KEY = "segflow_files_sha256"
REGISTER_AGAIN = "register the model again with `segflow register`"


class PromotionRefused(SegflowError):
    """The gate (or the registry's state) refused a promotion; the champion is unchanged."""

    exit_code = VALIDATION_FAILED


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
    candidate: str | None = None  # the model of the run it came from (an architecture, or teacher)


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


def check_sha256(model: str, recorded: dict[Path, str | None]) -> None:
    """Refuse to load ``model`` unless each file has the SHA-256 ``recorded`` for it when it was registered."""
    for path, expected in recorded.items():
        actual = file_sha256(path) if path.is_file() else None
        if actual is None or actual != expected:
            raise SegflowError(
                f"{model}: {path.name} has SHA-256 {actual or 'none (the file is missing)'}, not the "
                f"{expected or 'none'} recorded when it was registered: its files in the artifact store were "
                f"changed or damaged since, so it is not loaded. Restore them, or {REGISTER_AGAIN}."
            )


def segflow_flavor(mlmodel: Model, model: str) -> dict:
    """``model``'s python_function flavor, refused unless it loads with segflow's own :data:`LOADER_MODULE` and
    takes no code from the artifact store."""
    flavor = mlmodel.flavors.get("python_function", {})
    loader, code = flavor.get("loader_module"), flavor.get("code") or flavor.get("model_code_path")
    if loader == LOADER_MODULE and not code and "data" in flavor:
        return flavor
    if flavor.get("model_code_path"):
        raise SegflowError(f"{model} was registered by an older segflow, which stored the model's code in the "
                           f"artifact store; segflow no longer loads such a version: {REGISTER_AGAIN}.")
    raise SegflowError(
        f"{model}: its MLmodel loads with {loader!r}{' and code from the artifact store' if code else ''}, not with "
        f"segflow's {LOADER_MODULE!r} from the installed package: not a segflow model, or its MLmodel was "
        "altered in the artifact store. It is neither loaded nor promoted."
    )


def registered_files(version: ModelVersion, local: Path) -> Path:
    """The data folder (weights and card) of ``version``'s artifact downloaded to ``local``, once its MLmodel
    and weights match the SHA-256s in the version's tags and the card the one in the (now trusted) MLmodel."""
    model = f"{version.name} v{version.version}"
    if MLMODEL_TAG not in version.tags or WEIGHTS_TAG not in version.tags:
        raise SegflowError(f"{model} has no {MLMODEL_TAG} and {WEIGHTS_TAG} tags to check its files against "
                           f"(registered by an older segflow, or not by segflow): {REGISTER_AGAIN}.")
    mlmodel_file = local / MLMODEL_FILE
    check_sha256(model, {mlmodel_file: version.tags[MLMODEL_TAG]})  # before reading anything it says
    mlmodel = Model.load(mlmodel_file)
    data_dir = local / segflow_flavor(mlmodel, model)["data"]
    card_sha256 = (mlmodel.metadata or {}).get(FILES_METADATA_KEY, {}).get(CARD_FILE)
    check_sha256(model, {data_dir / WEIGHTS_FILE: version.tags[WEIGHTS_TAG], data_dir / CARD_FILE: card_sha256})
    return data_dir


def download_registered_model(uri: str, dst: Path) -> Path:
    """Download the registered version ``uri`` names (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) into
    ``dst``; returns its data folder, checked against the registry (:func:`registered_files`)."""
    client = MlflowClient()
    try:
        resolved = get_model_name_and_version(client, uri)
        if len(resolved) == 1:  # models:/<model id>: a logged model, with no registry record to check it against
            raise SegflowError(f"{uri}: not a registered model version; give models:/NAME/VERSION or "
                               "models:/NAME@ALIAS, whose files segflow checks against the registry.")
        version = client.get_model_version(*resolved)
        # The version resolved once: an alias moved meanwhile must not bring files other than those its tags describe.
        local = mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(dst))
    except (MlflowException, OSError) as exc:
        if (unreachable := tracking.unreachable_server_error(exc)) is not None:
            raise unreachable from exc
        raise SegflowError(f"{uri}: cannot download the model ({exc}).") from None
    return registered_files(version, Path(local))


def missing_artifacts(name: str, version: str) -> list[str]:
    """The files the served model needs (MLmodel, the weights and card) that the artifact store no longer has;
    a version whose MLmodel does not load with segflow's own module is refused (:func:`segflow_flavor`)."""
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
    data_dir = segflow_flavor(Model.load(uri), f"{name} v{version}")["data"]
    present |= {f.path for f in repo.list_artifacts(data_dir)}
    needed = [f"{data_dir}/{WEIGHTS_FILE}", f"{data_dir}/{CARD_FILE}"]
    return [path for path in needed if path not in present]


def connect(mlflow_cfg: MlflowParams) -> MlflowClient:
    """A client on the store ``segflow register`` writes to (also for the ``models:/`` downloads)."""
    uri = tracking.tracking_uri(mlflow_cfg)
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


def require_intact(name: str, version: str) -> None:
    """Refuse to make ``version`` the champion unless its files are all there and are the ones registered: the
    MLmodel, weights and card are downloaded and checked against the SHA-256s recorded at registration
    (:func:`registered_files`). The download is the price of a promotion that cannot point the alias at
    tampered weights."""
    if missing := missing_artifacts(name, version):
        raise PromotionRefused(
            f"{name} v{version} cannot become champion: its model artifact is incomplete, missing "
            f"{', '.join(missing)} (deleted from the artifact store?). Register a new version instead."
        )
    with tempfile.TemporaryDirectory(prefix="segflow-promote-") as local:
        try:
            download_registered_model(f"models:/{name}/{version}", Path(local))
        except SegflowError as exc:
            if exc.__cause__ is not None:  # the store could not be reached: not this version's fault
                raise
            raise PromotionRefused(f"{name} v{version} cannot become champion: {exc}") from None


def rollback(mlflow_cfg: MlflowParams, name: str) -> tuple[str | None, str]:
    """Point ``champion`` back at the champion before the current one (per the history); returns (from, to)."""
    client = connect(mlflow_cfg)
    registered_model(client, name)
    with promotion_lock(client, name):
        lineage = champion_lineage(champion_history(client, name))
        if len(lineage) < 2:
            raise SegflowError(f"{name}: no previous champion to roll back to "
                               f"(champion history: {', '.join('v' + v for v in lineage) or 'empty'}).")
        current, target = champion_version(client, name), lineage[-2]
        require_intact(name, target)
        record_champion(client, name, history_entry(target, "rollback", f"rollback from v{lineage[-1]}", current))
    return version_number(current), target



# --- the project's own record of its registrations -------------------------------------------------------

REGISTRATIONS_FILE = "registrations.jsonl"  # beside register's decision file; kept by DVC across runs


def _without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    return parts._replace(netloc=parts.hostname or "").geturl() if parts.username or parts.password else uri


def recorded_versions(record_file: Path, name: str) -> list[dict]:
    """The registrations of ``name`` on record since its history last started (``--force`` starts one)."""
    if not Path(record_file).exists():
        return []
    entries = []
    for number, line in enumerate(Path(record_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise SegflowError(
                f"{record_file}: line {number} is not a whole JSON record ({shown(line, 120)}): a write cut short "
                "(a full disk, a killed process) or an edit. Restore the file from git (`git checkout "
                f"{record_file}`), or delete that line if it was the last registration's; then run again.") from None
    entries = [entry for entry in entries if entry.get("model_name") == name]
    starts = [i for i, entry in enumerate(entries) if entry.get("new_history")]
    return entries[starts[-1]:] if starts else entries


IDENTITY_KEYS = ("run_id", "created")  # what tells a registered version from another store's of the same number


def version_identity(version: ModelVersion) -> dict[str, str]:
    return {"run_id": str(version.run_id), "created": str(version.creation_timestamp)}


def check_history(client: MlflowClient, name: str, record_file: Path) -> None:
    """Refuse a registry that lacks versions the project registered before (a deleted ``mlflow.db``, another
    tracking URI), or whose versions are not those (another store holding a model of the same name with as many
    versions): registering there would promote a first champion ungated, or gate against a stranger."""
    recorded = recorded_versions(record_file, name)
    if not recorded:
        return
    newest = max(recorded, key=lambda entry: int(entry["version"]))
    registry = _without_credentials(mlflow.get_registry_uri())
    fix = ("Restore that store or point MLFLOW_TRACKING_URI at it; or, to start a new history in this registry on "
           "purpose (its first champion is then promoted without a gate), run `segflow register --force`.")
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    stored = versions.get(str(newest["version"]))
    if stored is None:
        highest = max((int(v) for v in versions), default=0)
        found = f"only versions up to v{highest}" if highest else f"no model named '{name}'"
        raise SegflowError(
            f"{record_file}: this project registered {name} v{newest['version']} on {newest['at']} in "
            f"{newest['registry']}, but the model registry at {registry} has {found}: it has lost its history (a "
            f"deleted mlflow.db, or another tracking URI). {fix}")
    expected = {key: newest[key] for key in IDENTITY_KEYS if key in newest}  # older records lack them
    actual = version_identity(stored)
    if any(actual[key] != value for key, value in expected.items()):
        raise SegflowError(
            f"{record_file}: this project registered {name} v{newest['version']} on {newest['at']} in "
            f"{newest['registry']} (training run {expected.get('run_id')}, created {expected.get('created')}), but "
            f"v{newest['version']} in the model registry at {registry} is another model (run {actual['run_id']}, "
            f"created {actual['created']}): a different store holding a model of the same name. {fix}")


def record_registration(record_file: Path, decision: Decision, new_history: bool, version: ModelVersion) -> None:
    """Append the registration of ``version`` to the project's record (one JSON line; the file is never
    rewritten), with what identifies it in its registry (:data:`IDENTITY_KEYS`)."""
    entry = {"model_name": decision.model_name, "version": decision.version, "arch": decision.arch,
             "promoted": decision.promoted, "at": _utc_now(),
             "registry": _without_credentials(mlflow.get_registry_uri()), "new_history": new_history,
             **version_identity(version)}
    Path(record_file).parent.mkdir(parents=True, exist_ok=True)
    with open(record_file, "a") as file:
        file.write(json.dumps(entry) + "\n")
