"""The registered MLflow model, logged as code (MLflow "models from code"), so loading it runs no pickle.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(image)`` turns an HxWx3 uint8 image into an HxW
uint8 class-index mask (an NxHxWx3 batch gives NxHxW). Weights come from the safetensors artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from segflow.errors import SegflowError
from segflow.inference import load_model, predict_mask, resolve_device


class SegmentationModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.card = load_model(Path(context.artifacts["model_dir"]), resolve_device("auto"))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.dtype != np.uint8:
            images = images.clip(0, 255).astype(np.uint8)
        if images.ndim == 3:
            return predict_mask(self.model, images)
        if images.ndim == 4:
            return np.stack([predict_mask(self.model, image) for image in images])
        raise SegflowError(f"expected an HxWx3 image or an NxHxWx3 batch, got shape {images.shape}.")


mlflow.models.set_model(SegmentationModel())
