"""Loading a registered model runs no code from the artifact store, and its files are checked against the registry.

The attacker here can write to the artifact store (the bucket: the version's folder on disk) but not to the
registry (the database that holds the version's tags).
"""

from __future__ import annotations

import base64
import json

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from promotion_testing import promote
from register_testing import ARCH, artifact_dir, register_version
from segflow import models
from segflow.config import InferenceParams
from segflow.data.fingerprint import file_sha256
from segflow.data.imageio import read_image
from segflow.errors import SegflowError
from segflow.inference.card import ModelCard
from segflow.inference.predictor import load_model, predict_mask, save_model
from segflow.registry.mlflow_registry import LOADER_MODULE, MLMODEL_TAG, WEIGHTS_TAG, segflow_flavor
from segflow.registry.model_source import resolve_model_dir

IMAGE = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)


def segflow_mask(uri: str) -> np.ndarray:
    with resolve_model_dir(uri) as model_dir:
        return predict_mask(load_model(model_dir)[0], IMAGE)


def test_the_registered_artifact_holds_data_only_and_loads_with_segflows_module(workspace):
    register_version(workspace, "load-layout", 0.5)
    stored = artifact_dir("load-layout")
    assert not [p for p in stored.rglob("*") if p.suffix in (".py", ".pyc", ".pkl")]
    flavor = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == LOADER_MODULE == "segflow.registry.pyfunc_model" and not flavor.get("code")
    # What the served model needs, nothing else: the weights, and the card with the settings it was evaluated with.
    assert sorted(p.name for p in (stored / flavor["data"]).iterdir()) == ["model.json", "model.safetensors"]
    card = json.loads((stored / flavor["data"] / "model.json").read_text())
    assert card["extra"]["inference"] == InferenceParams().model_dump(mode="json")
    version = MlflowClient().get_model_version("load-layout", "1")
    assert version.tags[MLMODEL_TAG] == file_sha256(stored / "MLmodel")
    assert version.tags[WEIGHTS_TAG] == file_sha256(stored / flavor["data"] / "model.safetensors")

    model = mlflow.pyfunc.load_model("models:/load-layout@champion")
    mask = model.predict(IMAGE)
    assert mask.dtype == np.uint8 and mask.shape == IMAGE.shape[:2]
    np.testing.assert_array_equal(mask, predict_mask(load_model(workspace / "models" / ARCH)[0], IMAGE))
    np.testing.assert_array_equal(segflow_mask("models:/load-layout/1"), mask)
    with pytest.raises(MlflowException):  # the signature: uint8 HxWx3 only
        model.predict(IMAGE.astype(np.float32))


def test_the_registered_model_reads_encoded_images_as_evaluation_reads_files(workspace, tmp_path):
    register_version(workspace, "load-encoded", 0.5)
    served = mlflow.pyfunc.load_model("models:/load-encoded@champion")
    network = load_model(workspace / "models" / ARCH)[0]
    # A JPEG whose EXIF says "rotate 90°": the mask must be that of the upright picture evaluation reads.
    path, exif = tmp_path / "rotated.jpg", Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(IMAGE).save(path, exif=exif)
    upright = read_image(path)
    assert upright.shape == (20, 12, 3)
    expected = predict_mask(network, upright, InferenceParams())  # the settings register_version evaluates with
    np.testing.assert_array_equal(served.predict(path.read_bytes()), expected)
    text = base64.encodebytes(path.read_bytes()).decode()  # line breaks, as the `base64` tool writes it
    np.testing.assert_array_equal(served.predict(text), expected)

    probabilities = served.predict(path.read_bytes(), params={"output": "probabilities"})
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 20, 12)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), expected)

    for bad, reason in [
        (b"GIF89a truncated", "the image sent: cannot decode image"), ("not base64!", "is not base64"),
        (IMAGE.astype(np.float32), "got an array of float32"), (IMAGE[..., :2], r"shape \(12, 20, 2\)"),
        (IMAGE.astype(np.int64) + 200, "pixel values must be 0-255"),
    ]:
        with pytest.raises(MlflowException, match=reason):
            served.predict(bad)
    with pytest.raises(MlflowException, match="params.output is 'logits'; it must be one of 'mask', 'probabilities'"):
        served.predict(IMAGE, params={"output": "logits"})


def test_code_planted_in_the_artifact_store_never_runs(workspace, tmp_path):
    register_version(workspace, "load-planted", 0.5)
    before = segflow_mask("models:/load-planted@champion")
    stored, marker = artifact_dir("load-planted"), tmp_path / "planted-code-ran"
    payload = f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"
    planted = list(stored.rglob("*.py"))
    assert planted == []  # nothing to append to: the artifact holds no code
    planted += [stored / "pyfunc_model.py", stored / "data" / ARCH / "pyfunc_model.py"]
    for path in planted:
        with open(path, "a") as file:
            file.write(payload)

    np.testing.assert_array_equal(mlflow.pyfunc.load_model("models:/load-planted@champion").predict(IMAGE), before)
    np.testing.assert_array_equal(segflow_mask("models:/load-planted@champion"), before)
    assert not marker.exists()


@pytest.mark.parametrize("file_name", ["model.safetensors", "model.json"])
def test_model_files_changed_in_the_store_are_refused_naming_both_hashes(workspace, tmp_path, file_name):
    name = f"load-swapped-{file_name.split('.')[1]}"
    register_version(workspace, name, 0.5)
    stored = artifact_dir(name) / "data" / ARCH / file_name
    recorded = file_sha256(stored)
    torch.manual_seed(1)  # other weights, or a card that normalises images differently: both well-formed
    save_model(models.build(ARCH, num_classes=2, width=0.0625),
               ModelCard(arch=ARCH, num_classes=2, classes=["background", "thing"], options={"width": 0.0625},
                         mean=(0.0, 0.0, 0.0)), tmp_path / "other")
    stored.write_bytes((tmp_path / "other" / file_name).read_bytes())
    changed = file_sha256(stored)

    with pytest.raises(SegflowError, match=rf"{name} v1: {file_name} has SHA-256 {changed}, not the {recorded}"):
        segflow_mask(f"models:/{name}@champion")
    # MLflow's own load checks the files against the MLmodel's record (integrity only: the MLmodel is in the store).
    with pytest.raises(SegflowError, match=rf"{file_name} has SHA-256 {changed}, not the {recorded}"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")


def test_an_edited_mlmodel_is_refused(workspace):
    register_version(workspace, "load-mlmodel", 0.5)
    register_version(workspace, "load-mlmodel", 0.4)  # a challenger with files of its own
    mlmodel = artifact_dir("load-mlmodel", "2") / "MLmodel"
    recorded = file_sha256(mlmodel)
    # Point it at a flavor that unpickles its data: whoever can write the bucket could then run code.
    mlmodel.write_text(mlmodel.read_text().replace(f"loader_module: {LOADER_MODULE}", "loader_module: mlflow.sklearn"))

    with pytest.raises(SegflowError, match=rf"load-mlmodel v2: MLmodel has SHA-256 {file_sha256(mlmodel)}, "
                                           rf"not the {recorded}"):
        segflow_mask("models:/load-mlmodel@challenger")
    with pytest.raises(SegflowError, match="loads with 'mlflow.sklearn', not with segflow's 'segflow.registry.pyfunc_model'"):
        promote(workspace, "load-mlmodel", "2", force=True, reason="try anyway")
    assert str(MlflowClient().get_model_version_by_alias("load-mlmodel", "champion").version) == "1"


def test_a_version_without_the_registry_hashes_is_refused_and_registering_again_replaces_it(workspace):
    # As a version registered by an older segflow, or by hand: nothing in the registry to check its files against.
    register_version(workspace, "load-untagged", 0.5)
    MlflowClient().delete_model_version_tag("load-untagged", "1", MLMODEL_TAG)
    with pytest.raises(SegflowError, match="load-untagged v1 has no mlmodel_sha256 .*register the model again"):
        segflow_mask("models:/load-untagged/1")
    assert register_version(workspace, "load-untagged", 0.5).version == "2"  # not reused


def test_a_version_logged_as_code_by_an_older_segflow_is_refused():
    older = Model().add_flavor("python_function", loader_module="mlflow.pyfunc.loaders.code_model",
                               model_code_path="pyfunc_model.py")
    with pytest.raises(SegflowError, match="segflow v1 was registered by an older segflow.*register the model again"):
        segflow_flavor(older, "segflow v1")
