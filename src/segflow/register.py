"""Register the best evaluated architecture in the MLflow Model Registry and promote it through a gate.

The new version always gets the alias ``challenger``; it becomes ``champion`` only when its test score beats
the champion's by ``register.margin`` on the same test data (the champion is re-scored when the test split
changed since it was scored). Every change of champion is kept in the registered model's tags.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch.utils.data import DataLoader

import segflow
from segflow import tracking
from segflow.config import Params
from segflow.data import SegmentationDataset, load_samples, pad_collate
from segflow.errors import SegflowError
from segflow.evaluate import compare_metrics, confusion_over
from segflow.fsutil import atomic_write_json
from segflow.inference import load_model, resolve_model_dir

log = logging.getLogger("segflow.register")

CHAMPION, CHALLENGER = "champion", "challenger"
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
    outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
)
# What the served model needs; listing it explicitly also spares MLflow a slow dependency inference.
PIP_REQUIREMENTS = [
    f"segflow=={segflow.__version__}", "torch==2.14.1", "torchvision==0.29.1", "segmentation-models-pytorch==0.6.0",
    "timm==1.0.31", "safetensors==0.8.0", "numpy==2.4.6", "pillow==13.0.0", "mlflow==3.17.2",
]


@dataclass
class Decision:
    model_name: str
    version: str
    arch: str
    score: float
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def score_registered_version(params: Params, name: str, version: str, data_dir: Path, splits_csv: Path) -> float:
    """Re-score a registered version on the current test split (its weights, not its old metric)."""
    samples = load_samples(data_dir, splits_csv, "test")
    with resolve_model_dir(f"models:/{name}/{version}") as model_dir:
        model, card = load_model(model_dir)
    loader = DataLoader(SegmentationDataset(samples), batch_size=params.evaluate.batch_size, collate_fn=pad_collate)
    confusion = confusion_over(model, loader, card.num_classes, torch.device("cpu"), params.evaluate.inference,
                               params.train.crop_size)
    return float(confusion.compute()[params.register_.metric])


def register(
    params: Params, *, metrics_dir: Path, models_dir: Path, data_dir: Path, splits_csv: Path, out_file: Path
) -> Decision:
    """Register the best of ``params.train.archs`` (by ``register.metric``) and apply the promotion gate."""
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
    client = MlflowClient()

    with tracking.stage_run(params.mlflow, "register") as run:
        model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"model_dir": str(Path(models_dir) / best_arch)},
            signature=SIGNATURE,
            pip_requirements=PIP_REQUIREMENTS,
        )
        tags = {
            "arch": best_arch, f"test_{cfg.metric}": str(best_score), "test_data_hash": str(best["test_data_hash"]),
            "git_commit": tracking.git_commit() or "unknown", "source_run_id": run.info.run_id,
        }
        version = mlflow.register_model(model_info.model_uri, cfg.model_name, tags=tags).version
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        mlflow.log_metrics({f"challenger_{cfg.metric}": best_score})

        champion = _champion(client, cfg.model_name)
        champion_score = None
        if champion is None:
            promoted, reason = True, "no champion yet"
        else:
            if champion.tags.get("test_data_hash") == best["test_data_hash"]:
                champion_score = float(champion.tags[f"test_{cfg.metric}"])
            else:
                log.info("test split changed since champion v%s was scored; re-scoring it", champion.version)
                champion_score = score_registered_version(params, cfg.model_name, champion.version, data_dir, splits_csv)
            promoted = best_score > champion_score + cfg.margin
            reason = (
                f"{cfg.metric} {best_score:.4f} {'beats' if promoted else 'does not beat'} champion "
                f"v{champion.version} {champion_score:.4f} by more than margin {cfg.margin}"
            )
        if promoted:
            promote(client, cfg.model_name, version, reason)
        decision = Decision(
            cfg.model_name, str(version), best_arch, best_score, str(champion.version) if champion else None,
            champion_score, promoted, reason,
        )
        mlflow.set_tags({"segflow.promoted": str(promoted), "segflow.decision": reason})
        atomic_write_json(out_file, asdict(decision))
        mlflow.log_artifact(str(out_file))
    log.info("registered %s v%s (%s): %s", cfg.model_name, version, best_arch, reason)
    return decision


def promote(client: MlflowClient, name: str, version: str, reason: str) -> None:
    """Point ``champion`` at ``version`` and append the change to the model's champion history."""
    history = json.loads(client.get_registered_model(name).tags.get("champion_history", "[]"))
    history.append({"version": str(version), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason})
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, "champion_history", json.dumps(history))
