"""The registered MLflow model, logged as code (MLflow "models from code"), so loading it runs no pickle.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(image)`` turns an HxWx3 uint8 image into an HxW
uint8 class-index mask. Weights come from the safetensors artifact.

The signature (``segflow.register.SIGNATURE``) is enforced before ``predict`` runs: MLflow refuses other
dtypes and shapes (one image per call; ``mlflow models serve`` casts a JSON ``{"inputs": [[[r, g, b], ...]]}``
to uint8 first), so ``predict`` always gets one HxWx3 uint8 image.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from segflow.inference import load_model, predict_mask, resolve_device


class SegmentationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.card = load_model(Path(context.artifacts["model_dir"]), resolve_device("auto"))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return predict_mask(self.model, np.asarray(model_input))


mlflow.models.set_model(SegmentationModel())
