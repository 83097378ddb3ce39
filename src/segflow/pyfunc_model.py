"""The registered MLflow model's loader: the model is logged with ``loader_module="segflow.pyfunc_model"``, so
MLflow imports this module from the installed segflow package and calls :func:`_load_pyfunc` on the model's data
folder. The artifact store holds data only (the MLmodel, safetensors weights, a JSON card): no code, no pickle.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(image)`` turns an HxWx3 uint8 image into an HxW
uint8 class-index mask. The signature (``segflow.register.SIGNATURE``) is enforced before ``predict`` runs: MLflow
refuses other dtypes and shapes (one image per call; ``mlflow models serve`` casts a JSON
``{"inputs": [[[r, g, b], ...]]}`` to uint8 first), so ``predict`` always gets one HxWx3 uint8 image.

What is protected, and what is not, against someone who can write to the artifact store (the bucket) but not
to the registry:

* segflow's own loads of a registered model (``segflow predict``, the register gate, anything given a
  ``models:/`` URI) check the downloaded MLmodel and weights against the SHA-256s in the version's registry tags
  and refuse a mismatch (:func:`segflow.registry.download_registered_model`); they never import model code.
* ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` trust the MLmodel they download: a file added to the
  bucket beside it is never run, but an edited MLmodel can make MLflow import other code before any segflow code
  runs. :func:`_load_pyfunc` checks the weights and card against the SHA-256s in the MLmodel's metadata, which
  catches corruption, not an attacker (who edits the metadata too). Serve only from a store whose write access
  you trust as you trust your code, or load through segflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from mlflow.models import Model

from segflow import CARD_FILE, WEIGHTS_FILE
from segflow.inference import load_model, predict_mask, resolve_device
from segflow.registry import FILES_METADATA_KEY, MLMODEL_FILE, check_sha256


class SegmentationModel:
    """What ``_load_pyfunc`` returns; MLflow's ``PyFuncModel`` enforces the signature, then calls ``predict``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def predict(self, model_input, params=None) -> np.ndarray:
        return predict_mask(self.model, np.asarray(model_input))


def _load_pyfunc(data_path: str) -> SegmentationModel:
    """MLflow's entry point. ``data_path`` is the model folder as MLflow stores it, ``data/<folder>`` beside the
    MLmodel, whose metadata records the SHA-256 of the weights and card (checked before they are read)."""
    data_dir = Path(data_path)
    root = data_dir.parents[1]
    recorded = (Model.load(root / MLMODEL_FILE).metadata or {}).get(FILES_METADATA_KEY, {})
    check_sha256(f"the model in {root}", {data_dir / name: recorded.get(name) for name in (WEIGHTS_FILE, CARD_FILE)})
    model, _ = load_model(data_dir, resolve_device("auto"))
    return SegmentationModel(model)
