"""Promotions in a registry workspace, shared by the registry tests and the tracking-fault tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from register_testing import promote as promote_with
from register_testing import register_version
from segflow.config import parse_params
from segflow.data.datasets import load_samples
from segflow.inference.metrics import split_fingerprint
from segflow.registry.mlflow_registry import (
    Decision,
    PromotionRefused,
    champion_history,
)

PARAMS = parse_params({"register": {"margin": 0.01}})


BIN = Path(sys.executable).parent


def current_hash(workspace: Path) -> str:
    return split_fingerprint(load_samples(workspace / "data", workspace / "splits.csv", "test"))


def add_version(name: str, miou: float, data_hash: str) -> str:
    """Another version of ``name`` sharing version 1's model files (cheaper than logging a model again)."""
    client = MlflowClient()
    first = client.get_model_version(name, "1")
    tags = {**first.tags, "test_miou": str(miou), "test_data_hash": data_hash}
    # The source is the logged model, `models:/<model_id>`; a server wants its id as well (and leaves the
    # version's model_id out of its answers).
    model_id = first.source.removeprefix("models:/")
    return str(client.create_model_version(name, first.source, run_id=first.run_id, tags=tags,
                                           model_id=model_id).version)


def champion(name: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def promote(workspace: Path, name: str, version: str, **force_and_reason) -> Decision:
    return promote_with(PARAMS, name, version, data_dir=workspace / "data", splits_csv=workspace / "splits.csv",
                           **force_and_reason)


PROMOTE_ON_GO = """
import sys
from pathlib import Path
from segflow.config import parse_params
from segflow.registry.promotion import TestSplit, promote_version
print("ready", flush=True)
sys.stdin.readline()
params = parse_params({})
promote_version(sys.argv[1], sys.argv[2], register=params.register_, mlflow_cfg=params.mlflow, force=True,
                test=TestSplit(Path("-"), Path("-"), 1, params.evaluate.inference), reason="concurrent " + sys.argv[2])
"""


def check_concurrent_promotions(workspace: Path, name: str) -> None:
    """Two processes force-promote two versions of ``name`` at once (in the store of MLFLOW_TRACKING_URI)."""
    register_version(workspace, name, 0.5)
    versions = [add_version(name, 0.5, "hash-1") for _ in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", PROMOTE_ON_GO, name, v], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for v in versions]
    for worker in workers:
        assert worker.stdout.readline() == "ready\n"
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    history = champion_history(MlflowClient(), name)
    # Neither promotion is lost, and the alias is the one written last.
    assert sorted(h["version"] for h in history[1:]) == sorted(versions)
    assert champion(name) == history[-1]["version"]
    assert history[-1]["previous"] == history[-2]["version"]
    assert f"{name}.promotion-lock" not in {m.name for m in MlflowClient().search_registered_models()}


def check_deleted_model_files_are_refused(workspace: Path, name: str) -> None:
    """A version whose weights were deleted from the artifact store (of MLFLOW_TRACKING_URI) is not promoted."""
    register_version(workspace, name, 0.5)
    broken = register_version(workspace, name, 0.4).version  # its own model files, kept as challenger
    files = get_artifact_repository(MlflowClient().get_model_version_download_uri(name, broken))
    files.delete_artifacts("data/fcn32s/model.safetensors")
    with pytest.raises(PromotionRefused, match=rf"{name} v{broken} .*missing data/fcn32s/model.safetensors"):
        promote(workspace, name, broken, force=True, reason="try anyway")
    assert champion(name) == "1"
