"""`segflow predict`: masks, overlays and a submission CSV from a model folder or a registered model."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from register_testing import register_stage, write_scores
from segflow import CARD_FILE, models
from segflow.cli import main
from segflow.config import InferenceParams, parse_params
from segflow.data.imageio import read_image, read_mask, write_image
from segflow.errors import SegflowError
from segflow.inference.card import ModelCard, read_card
from segflow.inference.predictor import load_model, resolved_inference, save_model
from segflow.inference.visualize import palette
from segflow.registry import tracking
from segflow.registry.model_source import resolve_model_dir
from segflow.registry.pyfunc_model import SegmentationModel, decode_image
from segflow.stages.predict import predict, within_limits

ARCH, NUM_CLASSES = "fcn32s", 4
SIZES = {"a.png": (20, 24), "b.jpg": (17, 31), "c.bmp": (32, 32)}  # (height, width)
PARAMS = {
    "train": {"device": "cpu"},
    "evaluate": {"inference": {"mode": "slide", "crop_size": 16, "flip": True}},
    "predict": {"batch_size": 2, "csv_size": [8, 6]},
}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(1)  # an untrained network that does not predict one class everywhere: settings show
    model = models.build(ARCH, num_classes=NUM_CLASSES, width=0.0625)
    card = ModelCard(arch=ARCH, num_classes=NUM_CLASSES, classes=["bg", "x", "y", "z"], options={"width": 0.0625})
    save_model(model, card, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def images_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (height, width) in SIZES.items():
        write_image(folder / name, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_writes_masks_overlays_and_csv(tmp_path, model_dir, images_dir):
    result = predict(parse_params(PARAMS), model=model_dir, images_dir=images_dir, out_dir=tmp_path / "out",
                     csv_file=tmp_path / "submission.csv")
    assert result.images == 3
    for name, size in SIZES.items():
        stem = Path(name).stem
        mask = read_mask(tmp_path / "out" / "masks" / f"{stem}.png")
        assert mask.shape == size and mask.max() < NUM_CLASSES
        with Image.open(tmp_path / "out" / "masks" / f"{stem}.png") as img:  # in a viewer: the overlays' colours
            assert img.mode == "P"
            assert img.getpalette()[: 3 * NUM_CLASSES] == palette(NUM_CLASSES)[:NUM_CLASSES].ravel().tolist()
        assert read_image(tmp_path / "out" / "overlays" / f"{stem}.png").shape == (*size, 3)
    assert (tmp_path / "out" / "legend.png").is_file()
    with open(tmp_path / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_id", "mask"]
    assert [row[0] for row in rows[1:]] == ["a", "b", "c"]
    for row in rows[1:]:
        values = [int(v) for v in row[1].split(" ")]
        assert len(values) == 8 * 6 and max(values) < NUM_CLASSES


def test_corrupt_image_exits_2_naming_the_file_and_writes_nothing(tmp_path, model_dir, images_dir, monkeypatch, capsys):
    (images_dir / "c.bmp").write_bytes(b"BM not really a bitmap")  # in the second batch
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    monkeypatch.setattr(sys, "argv", [
        "segflow", "predict", "--model", str(model_dir), "--images", str(images_dir), "--out", str(tmp_path / "out"),
        "--csv", str(tmp_path / "submission.csv"), "--params", str(params_file),
    ])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "segflow: error:" in stderr and "c.bmp" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model", "params.yaml"]


def masks(out_dir: Path) -> list[np.ndarray]:
    return [read_mask(out_dir / "masks" / f"{Path(name).stem}.png") for name in SIZES]


def test_a_registered_model_predicts_with_the_settings_it_was_registered_with(tmp_path, model_dir, images_dir):
    shutil.copytree(model_dir, tmp_path / "models" / ARCH)
    params = parse_params({**PARAMS, "train": {"device": "cpu", "archs": [ARCH]},
                           "register": {"model_name": "predict-test"}})
    write_scores(tmp_path / "evaluation", ARCH, arch=ARCH, test=0.5,  # scored as evaluate writes its settings
                 inference=resolved_inference(params.evaluate.inference, read_card(model_dir), model_dir))
    register_stage(params, candidates=[ARCH], evaluation_dir=tmp_path / "evaluation", models_dir=tmp_path / "models",
             data_dir=tmp_path / "-", splits_csv=tmp_path / "-",
             out_file=tmp_path / "decision.json")  # the first version: promoted unscored
    predict(params, model=model_dir, images_dir=images_dir, out_dir=tmp_path / "as-evaluated")

    # evaluate.inference changed since: a model folder follows it, the registered model keeps its own (served) one.
    today = parse_params({**PARAMS, "evaluate": {"inference": {"mode": "whole"}}})
    predict(today, model="models:/predict-test@champion", images_dir=images_dir, out_dir=tmp_path / "registered")
    predict(today, model=model_dir, images_dir=images_dir, out_dir=tmp_path / "whole")
    for registered, evaluated in zip(masks(tmp_path / "registered"), masks(tmp_path / "as-evaluated")):
        np.testing.assert_array_equal(registered, evaluated)
    assert any(not np.array_equal(a, b) for a, b in zip(masks(tmp_path / "whole"), masks(tmp_path / "as-evaluated")))


def test_a_model_folder_slides_the_window_it_was_trained_at(tmp_path, model_dir, images_dir):
    training_crop = parse_params({**PARAMS, "evaluate": {"inference": {"mode": "slide", "flip": True}}})
    with pytest.raises(SegflowError, match=f"{re.escape(str(model_dir / CARD_FILE))}: .*no window size"):
        predict(training_crop, model=model_dir, images_dir=images_dir, out_dir=tmp_path / "older")  # no crop_size
    card = json.loads((model_dir / CARD_FILE).read_text())
    (model_dir / CARD_FILE).write_text(json.dumps({**card, "crop_size": 16}))
    predict(training_crop, model=model_dir, images_dir=images_dir, out_dir=tmp_path / "training-crop")
    predict(parse_params(PARAMS), model=model_dir, images_dir=images_dir, out_dir=tmp_path / "window-16")
    for a, b in zip(masks(tmp_path / "training-crop"), masks(tmp_path / "window-16")):
        np.testing.assert_array_equal(a, b)


def test_a_card_whose_inference_settings_this_segflow_cannot_read_is_refused(tmp_path, model_dir, images_dir):
    card = json.loads((model_dir / "model.json").read_text())
    card["extra"]["inference"] = {"mode": "tiles"}  # written by another segflow version
    (model_dir / "model.json").write_text(json.dumps(card))
    with pytest.raises(SegflowError, match=r"model.json: extra.inference is not a valid evaluate.inference .*mode"):
        predict(parse_params(PARAMS), model=model_dir, images_dir=images_dir, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_version_not_registered_by_segflow_is_refused(tmp_path, model_dir, images_dir, monkeypatch, capsys):
    # A plain model folder (as train logs it) registered by hand: no registry hashes to check its files against.
    with tracking.stage_run(parse_params(PARAMS).mlflow, "train", "predict-by-hand") as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="checkpoint")
        source = mlflow.get_artifact_uri("checkpoint")
    client = MlflowClient()
    client.create_registered_model("predict-by-hand")
    client.create_model_version("predict-by-hand", source, run_id=run.info.run_id)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    monkeypatch.setattr(sys, "argv", ["segflow", "predict", "--model", "models:/predict-by-hand/1", "--images",
                                      str(images_dir), "--out", str(tmp_path / "out"), "--params", str(params_file)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "predict-by-hand v1 has no mlmodel_sha256 and weights_sha256 tags" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_an_output_folder_holding_the_images_are_errors(tmp_path, images_dir):
    with pytest.raises(SegflowError, match="no such model folder"), resolve_model_dir(tmp_path / "nowhere"):
        pass
    for out_dir, relation in [(tmp_path, "contains"), (images_dir, "is"), (images_dir / "predicted", "lies inside")]:
        with pytest.raises(SegflowError, match=f"output folder .* {relation} the input"):
            predict(parse_params(PARAMS), model=tmp_path / "nowhere", images_dir=images_dir, out_dir=out_dir)
    assert sorted(p.name for p in images_dir.iterdir()) == ["a.png", "b.jpg", "c.bmp", "notes.txt"]


@pytest.mark.parametrize("csv_path, message", [
    ("folder", "is a folder; give the path of the CSV file"),
    ("file.txt/x.csv", "does not exist \\(or is a file\\)"),
])
def test_a_csv_path_that_cannot_be_written_exits_2_before_anything_is_written(tmp_path, model_dir, images_dir,
                                                                               monkeypatch, capsys, csv_path, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("a file, not a folder")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    monkeypatch.setattr(sys, "argv", [
        "segflow", "predict", "--model", str(model_dir), "--images", str(images_dir), "--out", str(tmp_path / "out"),
        "--csv", str(tmp_path / csv_path), "--params", str(params_file),
    ])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert re.search(f"--csv {re.escape(str(tmp_path / csv_path))}.*{message}", stderr) and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_an_image_past_the_limits_is_refused_from_its_header_and_the_others_are_predicted(tmp_path, model_dir,
                                                                                        images_dir, monkeypatch,
                                                                                        capsys):
    Image.new("L", (9000, 9000)).save(images_dir / "huge.png")  # 310 kB, 81 megapixels once decoded
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    monkeypatch.setattr(sys, "argv", ["segflow", "predict", "--model", str(model_dir), "--images", str(images_dir),
                                      "--out", str(tmp_path / "out"), "--params", str(params_file)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert re.search(rf"1 image\(s\) not predicted: {re.escape(str(images_dir / 'huge.png'))} is 9000x9000 = "
                     r"81,000,000 pixels, more than the 4,000,000 this model takes", stderr)
    assert sorted(p.name for p in (tmp_path / "out/masks").iterdir()) == ["a.png", "b.png", "c.png"]

    small = parse_params({**PARAMS, "evaluate": {"inference": {"max_image_mb": 0.0001, "max_pixels": 500}}})
    refused = within_limits(sorted(images_dir.glob("*.*")), small.evaluate.inference)
    assert {path.name for path in refused} == {"a.png", "b.jpg", "c.bmp", "huge.png"}  # notes.txt: 12 bytes
    assert "MB encoded, more than the 0.0001 MB" in refused[images_dir / "a.png"]


def test_the_served_model_refuses_an_array_or_base64_text_past_its_limits():
    limits = InferenceParams(max_pixels=100, max_image_mb=0.001)
    with pytest.raises(SegflowError, match="the image sent is 11x10 = 110 pixels, more than the 100"):
        decode_image(np.zeros((10, 11, 3), dtype=np.uint8), limits)
    assert decode_image(np.zeros((10, 10, 3), dtype=np.uint8), limits).shape == (10, 10, 3)
    with pytest.raises(SegflowError, match="the image sent is 0.0 MB encoded, more than the 0.001 MB"):
        decode_image("A" * 2000, limits)  # refused by its length, before it is base64-decoded


def test_the_served_model_stops_a_request_whose_time_is_up(model_dir):
    model = SegmentationModel(load_model(model_dir)[0], InferenceParams(mode="slide", crop_size=16, max_seconds=1e-9))
    with pytest.raises(MlflowException, match=r"took more than 1e-09 s \(evaluate.inference.max_seconds\); stopped"):
        model.predict(np.zeros((40, 40, 3), dtype=np.uint8))
    assert SegmentationModel(load_model(model_dir)[0], None).predict(np.zeros((40, 40, 3), dtype=np.uint8)).shape == (40, 40)
