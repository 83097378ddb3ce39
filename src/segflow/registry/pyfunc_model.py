"""The registered MLflow model's loader: the model is logged with ``loader_module="segflow.registry.pyfunc_model"``, so
MLflow imports this module from the installed segflow package and calls :func:`_load_pyfunc` on the model's data
folder. The artifact store holds data only (the MLmodel, safetensors weights, a JSON card): no code, no pickle.

Served = evaluated: the card of a registered model carries the inference settings its test score was measured
with (``extra["inference"]``: ``evaluate.inference`` with the sliding window made concrete, written by
``segflow register``), and ``predict`` uses them: sliding window, flip and multi-scale test-time augmentation.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(image)`` takes one image, either

* an HxWx3 array of integers 0-255 (``mlflow models serve``: ``{"inputs": [[[r, g, b], ...], ...]}``), or
* an encoded image file (PNG, JPEG, ...): its bytes, or their base64 text (``{"inputs": "iVBORw0KGgo..."}``),
  decoded by :func:`segflow.data.imageio.read_image` as evaluation reads its files (EXIF orientation, RGB), so
  the same picture gives the same mask whichever way it is sent,

and returns, with ``params={"output": "mask"}`` (the default), the HxW uint8 class-index mask, or with
``{"output": "probabilities"}`` the KxHxW float32 class probabilities (channels first: ``[k]`` is class k's
map; they sum to 1 over k). No single MLflow input schema describes an array or a string, so the signature
(``segflow.stages.register.SIGNATURE``) declares none and :func:`decode_image` checks the input; a bad input or
``output`` is refused with an ``MlflowException`` (HTTP 400 from the scoring server) that says what is wrong.

What is protected, and what is not, against someone who can write to the artifact store (the bucket) but not
to the registry:

* segflow's own loads of a registered model (``segflow predict``, the register gate, anything given a
  ``models:/`` URI) check the downloaded MLmodel and weights against the SHA-256s in the version's registry tags
  and refuse a mismatch (:func:`segflow.registry.mlflow_registry.download_registered_model`); they never import model code.
* ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` trust the MLmodel they download: a file added to the
  bucket beside it is never run, but an edited MLmodel can make MLflow import other code before any segflow code
  runs. :func:`_load_pyfunc` checks the weights and card against the SHA-256s in the MLmodel's metadata, which
  catches corruption, not an attacker (who edits the metadata too). Serve only from a store whose write access
  you trust as you trust your code, or load through segflow.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from segflow import CARD_FILE, WEIGHTS_FILE
from segflow.config import InferenceParams
from segflow.data.imageio import header_size, read_image
from segflow.errors import SegflowError
from segflow.inference.card import registered_inference
from segflow.inference.predictor import (
    check_encoded_size,
    check_image_size,
    load_model,
    predict_mask,
    predict_probabilities,
    resolve_device,
    time_limit,
)
from segflow.registry.mlflow_registry import FILES_METADATA_KEY, MLMODEL_FILE, check_sha256

log = logging.getLogger(__name__)

OUTPUT_PARAM = "output"
OUTPUTS = {"mask": predict_mask, "probabilities": predict_probabilities}


def read_encoded_image(data: bytes, inference: InferenceParams) -> np.ndarray:
    """An encoded image file's bytes -> HxWx3 uint8, read by :func:`segflow.data.imageio.read_image` (which reads
    files: the bytes go through a temporary one), once its header shows a size ``inference`` allows."""
    check_encoded_size(len(data), inference, "the image sent")
    check_image_size(*header_size(io.BytesIO(data)), inference, "the image sent")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(data)
        try:
            return read_image(path)
        except SegflowError as exc:
            raise SegflowError(str(exc).replace(str(path), "the image sent")) from None


def decode_image(model_input: Any, inference: InferenceParams) -> np.ndarray:
    """One image as ``predict`` gets it (see the module docstring) -> HxWx3 uint8, refused past ``inference``'s
    limits (``max_image_mb``, ``max_pixels``) before it is decoded."""
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "US" and model_input.ndim == 0:
        model_input = model_input.item()  # the scoring server wraps a JSON string in a 0-d array
    if isinstance(model_input, str):
        check_encoded_size(len(model_input) * 3 // 4, inference, "the image sent")  # what the base64 decodes to
        try:
            model_input = base64.b64decode("".join(model_input.split()), validate=True)  # line breaks allowed
        except (binascii.Error, ValueError) as exc:
            raise SegflowError(f"the image sent as text is not base64 ({exc}); send the file's bytes "
                               "base64-encoded, e.g. `base64 -w0 image.png`.") from None
    if isinstance(model_input, (bytes, bytearray)):
        return read_encoded_image(bytes(model_input), inference)
    if isinstance(model_input, list):
        model_input = np.asarray(model_input)
    if not isinstance(model_input, np.ndarray) or model_input.dtype.kind not in "ui":
        kind = f"an array of {model_input.dtype}" if isinstance(model_input, np.ndarray) else type(model_input).__name__
        raise SegflowError(f"expected one image: an HxWx3 array of integers 0-255, or a PNG/JPEG file as bytes or "
                           f"base64 text; got {kind}.")
    if model_input.ndim != 3 or model_input.shape[2] != 3 or not model_input.size:
        raise SegflowError(f"expected one HxWx3 image, got an array of shape {model_input.shape}.")
    check_image_size(model_input.shape[1], model_input.shape[0], inference, "the image sent")
    if model_input.min() < 0 or model_input.max() > 255:
        raise SegflowError(f"pixel values must be 0-255, got {model_input.min()} to {model_input.max()}.")
    return model_input.astype(np.uint8)


class SegmentationModel:
    """What ``_load_pyfunc`` returns; MLflow's ``PyFuncModel`` checks ``params`` against the signature (filling
    in the default output), then calls ``predict``."""

    def __init__(self, model: torch.nn.Module, inference: InferenceParams | None) -> None:
        self.model = model
        self.inference = inference
        # An older registration carries no limits: the defaults' (4 megapixels, 16 MB).
        self.limits = inference or InferenceParams()

    def predict(self, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        output = (params or {}).get(OUTPUT_PARAM, "mask")
        if output not in OUTPUTS:
            raise MlflowException.invalid_parameter_value(
                f"params.{OUTPUT_PARAM} is {output!r}; it must be one of {', '.join(map(repr, OUTPUTS))}.")
        try:
            image = decode_image(model_input, self.limits)
            with time_limit(self.limits.max_seconds):
                return OUTPUTS[output](self.model, image, self.inference)
        except SegflowError as exc:  # the caller's input: a 400 with the reason, not a server error
            raise MlflowException.invalid_parameter_value(str(exc)) from None


def _load_pyfunc(data_path: str) -> SegmentationModel:
    """MLflow's entry point. ``data_path`` is the model folder as MLflow stores it, ``data/<folder>`` beside the
    MLmodel, whose metadata records the SHA-256 of the weights and card (checked before they are read)."""
    data_dir = Path(data_path)
    root = data_dir.parents[1]
    recorded = (Model.load(root / MLMODEL_FILE).metadata or {}).get(FILES_METADATA_KEY, {})
    check_sha256(f"the model in {root}", {data_dir / name: recorded.get(name) for name in (WEIGHTS_FILE, CARD_FILE)})
    model, card = load_model(data_dir, resolve_device("auto"))
    inference = registered_inference(card, data_dir)
    if inference is None:
        log.warning("the model in %s carries no inference settings (registered by an older segflow): it predicts "
                    "whole images without test-time augmentation; register it again to serve it as evaluated.", root)
    return SegmentationModel(model, inference)
