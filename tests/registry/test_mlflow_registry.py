"""Registry operations on a real (embedded) MLflow store: list, promote through the gate or by force, roll back,
concurrent promotions, a version whose files are gone, and serving the champion with `mlflow models serve`.
tests/pipelines/test_tracking_faults.py runs the concurrency and deleted-files checks on the MLflow server too."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

import segflow.registry.mlflow_registry
import segflow.registry.promotion
from promotion_testing import (
    BIN,
    PARAMS,
    add_version,
    champion,
    check_concurrent_promotions,
    check_deleted_model_files_are_refused,
    current_hash,
    promote,
)
from register_testing import ARCH, artifact_dir, register_stage, register_version, write_scores
from register_testing import promote as promote_with
from segflow.config import parse_params
from segflow.data.fingerprint import file_sha256
from segflow.data.imageio import read_image, write_image
from segflow.errors import SegflowError
from segflow.inference.predictor import load_model, predict_mask, predict_probabilities, resolved_inference
from segflow.registry.mlflow_registry import (
    FORCED_REASON_TAG,
    PromotionRefused,
    champion_history,
    format_versions,
    list_versions,
    rollback,
)
from segflow.registry.promotion import score_on
from segflow.registry.tracking import SERVER_UNREACHABLE


def test_listing_forcing_and_rolling_back_do_not_load_torch():
    # Importing torch and the models costs seconds on every `segflow models list` / `rollback`; only gating scores.
    code = ("import sys, segflow.registry.mlflow_registry, segflow.registry.promotion; "
            "print(sorted({'torch', 'segflow.stages.register'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_models_list_shows_every_version_with_its_aliases_and_test_data(workspace):
    register_version(workspace, "reg-list", 0.5, data_hash="a" * 40)
    add_version("reg-list", 0.4, "b" * 40)
    rows = list_versions(MlflowClient(), "reg-list", "miou")
    assert [(r.version, r.aliases, r.score, r.test_data_hash) for r in rows] == [
        ("1", "challenger,champion", "0.5", "a" * 12), ("2", "-", "0.4", "b" * 12)]
    assert rows[0].arch == "fcn32s" and rows[0].git_commit and rows[0].created.startswith("20")
    table = format_versions(rows, "miou").splitlines()
    assert table[0].split()[:4] == ["version", "aliases", "arch", "test"] and len(table) == 3


def test_promote_gates_on_the_current_test_data_and_force_needs_a_reason(workspace):
    data_hash = current_hash(workspace)
    register_version(workspace, "reg-gate", 0.5, data_hash=data_hash)
    close = add_version("reg-gate", 0.505, data_hash)  # better, but not by the 0.01 margin
    refused = promote(workspace, "reg-gate", close)
    assert not refused.promoted and refused.champion_score == pytest.approx(0.5) and "does not beat" in refused.reason
    # 0.99 was measured on other test data: the gate must re-score the weights on the current split.
    elsewhere = add_version("reg-gate", 0.99, "another-test-split")
    rescored = promote(workspace, "reg-gate", elsewhere)
    assert rescored.score < 0.99 and rescored.promoted == (rescored.score > 0.5 + 0.01)

    with pytest.raises(SegflowError, match="--reason"):
        promote(workspace, "reg-gate", close, force=True)
    forced = promote(workspace, "reg-gate", close, force=True, reason="hotfix for customer X")
    assert forced.promoted and champion("reg-gate") == close
    assert MlflowClient().get_model_version("reg-gate", close).tags[FORCED_REASON_TAG] == "hotfix for customer X"
    last = champion_history(MlflowClient(), "reg-gate")[-1]
    assert (last["version"], last["action"], last["reason"]) == (close, "forced", "hotfix for customer X")
    with pytest.raises(PromotionRefused, match="already the champion"):
        promote(workspace, "reg-gate", close, force=True, reason="again")


def test_the_gate_wants_more_than_the_margin_over_the_champion(workspace):
    data_hash = current_hash(workspace)
    register_version(workspace, "reg-edge", 0.25, data_hash=data_hash)
    params = parse_params({"register": {"margin": 0.25}})  # 0.25 + 0.25 is exactly 0.5

    def gate(miou: float) -> bool:
        version = add_version("reg-edge", miou, data_hash)
        return promote_with(params, "reg-edge", version, data_dir=workspace / "data",
                            splits_csv=workspace / "splits.csv").promoted

    assert not gate(0.5)  # equal: not more than the margin
    assert gate(math.nextafter(0.5, 1))


def test_rollback_walks_back_through_the_champions_and_stops_at_the_first(workspace):
    data_hash = current_hash(workspace)
    register_version(workspace, "reg-back", 0.5, data_hash=data_hash)
    for miou in (0.6, 0.7):
        promote(workspace, "reg-back", add_version("reg-back", miou, data_hash))
    assert champion("reg-back") == "3"
    assert rollback(PARAMS.mlflow, "reg-back") == ("3", "2")
    assert rollback(PARAMS.mlflow, "reg-back") == ("2", "1") and champion("reg-back") == "1"
    with pytest.raises(SegflowError, match="no previous champion"):
        rollback(PARAMS.mlflow, "reg-back")
    history = champion_history(MlflowClient(), "reg-back")
    assert [(h["version"], h["action"]) for h in history] == [
        ("1", "promote"), ("2", "promote"), ("3", "promote"), ("2", "rollback"), ("1", "rollback")]


def test_a_promotion_cut_short_between_history_and_alias_does_not_count(workspace, monkeypatch):
    data_hash = current_hash(workspace)
    register_version(workspace, "reg-cut", 0.5, data_hash=data_hash)
    second = add_version("reg-cut", 0.6, data_hash)
    set_alias = MlflowClient.set_registered_model_alias

    def server_gone_before_the_champion_alias(client, name, alias, version):
        if alias == "champion":
            raise ConnectionError("tracking server went away")
        return set_alias(client, name, alias, version)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", server_gone_before_the_champion_alias)
        with pytest.raises(ConnectionError):
            promote(workspace, "reg-cut", second, force=True, reason="cut short")
    assert champion("reg-cut") == "1"
    stored = json.loads(MlflowClient().get_registered_model("reg-cut").tags["champion_history"])
    assert [h["version"] for h in stored] == ["1", second]  # the history got ahead of the alias
    assert [h["version"] for h in champion_history(MlflowClient(), "reg-cut")] == ["1"]
    # Promoting again works, and a rollback goes back to version 1, not to the promotion that never was.
    third = add_version("reg-cut", 0.7, data_hash)
    assert promote(workspace, "reg-cut", third).promoted
    assert [h["version"] for h in champion_history(MlflowClient(), "reg-cut")] == ["1", third]
    assert rollback(PARAMS.mlflow, "reg-cut") == (third, "1")


def test_an_unreachable_artifact_store_is_not_a_broken_version(workspace, monkeypatch):
    register_version(workspace, "reg-store-down", 0.5, data_hash=current_hash(workspace))

    def store_down(uri):
        try:
            raise requests.exceptions.ConnectionError("connection refused")
        except requests.exceptions.ConnectionError:
            raise MlflowException("API request failed") from None  # MLflow keeps the cause as the context

    monkeypatch.setattr(segflow.registry.mlflow_registry, "get_artifact_repository", store_down)
    with pytest.raises(SegflowError, match=SERVER_UNREACHABLE) as refused:
        segflow.registry.mlflow_registry.missing_artifacts("reg-store-down", "1")
    assert not isinstance(refused.value, PromotionRefused)


def test_a_champion_change_while_gating_is_gated_again(workspace, monkeypatch):
    data_hash = current_hash(workspace)
    register_version(workspace, "reg-regate", 0.5, data_hash=data_hash)
    candidate, rival = add_version("reg-regate", 0.7, data_hash), add_version("reg-regate", 0.9, data_hash)

    def score_while_a_rival_is_promoted(version, *args):
        if str(version.version) == "1":  # another promotion lands while the gate scores the old champion
            promote(workspace, "reg-regate", rival, force=True, reason="concurrent")
        return score_on(version, *args)

    monkeypatch.setattr(segflow.registry.promotion, "score_on", score_while_a_rival_is_promoted)
    decision = promote(workspace, "reg-regate", candidate)
    # 0.7 beats the old champion's 0.5 but must not replace the rival's 0.9 that won meanwhile.
    assert not decision.promoted and decision.champion_version == rival and champion("reg-regate") == rival


# Force-promotes NAME VERSION once stdin says go, so that both processes reach the registry together.




def test_concurrent_promotions_leave_alias_and_history_in_agreement(workspace):
    check_concurrent_promotions(workspace, "reg-race")




def test_a_version_whose_model_files_were_deleted_is_never_promoted(workspace):
    check_deleted_model_files_are_refused(workspace, "reg-gone")


def _flip_last_byte(path: Path) -> tuple[str, str]:
    """One flipped byte in ``path``; returns its SHA-256 before and after."""
    before, data = file_sha256(path), bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    return before, file_sha256(path)


def test_promotion_and_rollback_refuse_a_version_whose_weights_changed_in_the_store(workspace):
    name = "reg-flipped"
    register_version(workspace, name, 0.5)
    second = register_version(workspace, name, 0.4).version  # its own model files, kept as challenger
    weights = artifact_dir(name, second) / "data" / ARCH / "model.safetensors"
    recorded, changed = _flip_last_byte(weights)
    with pytest.raises(PromotionRefused, match=rf"{name} v{second} cannot become champion: .*model.safetensors has "
                                               rf"SHA-256 {changed}, not the {recorded}"):
        promote(workspace, name, second, force=True, reason="one byte cannot matter")
    assert champion(name) == "1"

    _flip_last_byte(weights)  # restored: the same version now passes
    promote(workspace, name, second, force=True, reason="intact again")
    recorded, changed = _flip_last_byte(artifact_dir(name, "1") / "data" / ARCH / "model.safetensors")
    with pytest.raises(PromotionRefused, match=rf"{name} v1 cannot become champion: .*SHA-256 {changed}, not the "
                                               rf"{recorded}"):
        rollback(PARAMS.mlflow, name)
    assert champion(name) == second


def test_cli_refused_promotion_exits_1_with_the_reason(workspace, tmp_path):
    register_version(workspace, "reg-cli", 0.5, data_hash=current_hash(workspace))
    worse = add_version("reg-cli", 0.2, current_hash(workspace))
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "ingested").symlink_to(workspace / "data")
    (project / "data" / "splits.csv").symlink_to(workspace / "splits.csv")
    (project / "params.yaml").write_text(yaml.safe_dump({"register": {"margin": 0.01}}))
    result = subprocess.run([str(BIN / "segflow"), "promote", "reg-cli", "--version", worse], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"reg-cli v{worse} not promoted" in result.stderr and "does not beat champion v1" in result.stderr
    assert "Traceback" not in result.stderr and champion("reg-cli") == "1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Evaluated with a sliding window (the training crop on the card: no window of its own), flip and two scales: served
# the same.
SERVED_PARAMS = {"train": {"archs": [ARCH]},
                 "evaluate": {"inference": {"mode": "slide", "flip": True, "scales": [0.75, 1.25]}},
                 "register": {"model_name": "reg-serve"}}


def test_mlflow_models_serve_predicts_a_posted_png_as_evaluation_does(workspace, tmp_path):
    params = parse_params(SERVED_PARAMS)
    network, trained_card = load_model(workspace / "models" / ARCH)
    inference = resolved_inference(params.evaluate.inference, trained_card, workspace / "models" / ARCH)
    write_scores(workspace / "evaluation", ARCH, arch=ARCH, test=0.5,  # scored as evaluate writes its settings
                 inference=inference)
    register_stage(params, candidates=[ARCH], evaluation_dir=workspace / "evaluation", models_dir=workspace / "models",
             data_dir=workspace / "data", splits_csv=workspace / "splits.csv", out_file=workspace / "decision.json")
    local = Path(MlflowClient().get_model_version_download_uri("reg-serve", "1").removeprefix("file://"))
    assert not list(local.rglob("*.pkl")) and list(local.rglob("*.safetensors"))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "segflow.registry.pyfunc_model"  # the installed package's code, none from the store
    card = json.loads((local / flavor["data"] / "model.json").read_text())
    assert card["extra"]["inference"] == {"mode": "slide", "crop_size": 24, "stride": 16, "windows_per_batch": 8,
                                          "flip": True, "scales": [0.75, 1.25], "max_pixels": 4_000_000,
                                          "max_image_mb": 16.0, "max_seconds": 30.0}  # the window and the pixel limit concrete

    port, log = _free_port(), tmp_path / "serve.log"
    # The scoring server is started as `uvicorn`, found on PATH.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/reg-serve@champion", "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 120 s"
            try:
                requests.get(f"{url}/ping", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                time.sleep(0.5)

        def invoke(body: dict) -> requests.Response:
            return requests.post(f"{url}/invocations", json=body, timeout=60)

        png = tmp_path / "image.png"
        write_image(png, np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
        image = read_image(png)
        expected = predict_mask(network, image, inference)  # segflow's evaluation path
        assert not np.array_equal(expected, predict_mask(network, image))  # the settings matter for this image

        encoded = base64.b64encode(png.read_bytes()).decode()
        mask = np.asarray(invoke({"inputs": encoded}).json()["predictions"])
        np.testing.assert_array_equal(mask, expected)
        np.testing.assert_array_equal(invoke({"inputs": image.tolist()}).json()["predictions"], expected)

        answer = invoke({"inputs": encoded, "params": {"output": "probabilities"}})
        probabilities = np.asarray(answer.json()["predictions"])
        assert probabilities.shape == (2, 37, 53)
        np.testing.assert_allclose(probabilities.sum(axis=0), 1, atol=1e-5)
        np.testing.assert_allclose(probabilities, predict_probabilities(network, image, inference), atol=1e-5)

        refused = invoke({"inputs": base64.b64encode(b"not an image").decode()})
        assert refused.status_code == 400 and "the image sent: cannot decode image" in refused.json()["message"]

        # 9000x9000 black pixels: 310 kB on the wire, gigabytes once decoded. Refused from its header, at once.
        huge = io.BytesIO()
        Image.new("L", (9000, 9000)).save(huge, format="PNG")
        served = psutil.Process(server.pid)
        memory_before = sum(p.memory_info().rss for p in [served, *served.children(recursive=True)])
        started = time.monotonic()
        refused = invoke({"inputs": base64.b64encode(huge.getvalue()).decode()})
        assert refused.status_code == 400 and time.monotonic() - started < 2
        assert "is 9000x9000 = 81,000,000 pixels, more than the 4,000,000" in refused.json()["message"]
        memory_after = sum(p.memory_info().rss for p in [served, *served.children(recursive=True)])
        assert memory_after - memory_before < 300e6
        np.testing.assert_array_equal(invoke({"inputs": encoded}).json()["predictions"], expected)  # still serving
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
