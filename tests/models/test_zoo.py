"""The zoo's public API and the contract every registered model keeps."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from zoo_testing import TINY, check_training_step, tiny

from segflow import models
from segflow.errors import SegflowError
from segflow.models import zoo
from segflow.models.names import FAMILY_MODULES
from segflow.models.zoo import ModelInfo

PHASE1 = {
    "unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn", "pan", "linknet", "manet", "upernet", "segformer",
    "pspnet", "fcn32s", "fcn16s", "fcn8s", "fcn_resnet50",
}
PHASE2 = {
    "deconvnet", "segnet", "segnet_basic", "unet_original", "fcdensenet56", "fcdensenet67", "fcdensenet103",
    "deeplabv1_largefov", "dilatednet", "deeplabv2",
}


def test_available_is_sorted_and_complete() -> None:
    names = models.available()
    assert names == sorted(names)
    assert set(names) == PHASE1 | PHASE2


def test_every_model_has_a_tiny_test_config() -> None:
    assert set(models.available()) == set(TINY)


@pytest.mark.parametrize("name", models.available())
def test_describe(name: str) -> None:
    info = models.describe(name)
    assert isinstance(info, ModelInfo)
    assert info.name == name and info.family
    assert info.paper and "\n" not in info.paper and any(str(y) in info.paper for y in range(2010, 2030))
    assert "encoder_weights" in info.default_options and info.default_options["encoder_weights"] is None
    module = sys.modules[zoo._REGISTRY[name].builder.__module__]
    first_line = module.__doc__.strip().splitlines()[0]
    assert any(str(y) in first_line for y in range(2010, 2030)), f"{module.__name__} must open with a citation"


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(SegflowError) as err:
        models.build("unet3000", 3)
    assert "unet3000" in str(err.value)
    for name in models.available():
        assert name in str(err.value)
    with pytest.raises(SegflowError):
        models.describe("nope")


def test_unknown_option_is_named() -> None:
    with pytest.raises(SegflowError, match="encoder_nme"):
        models.build("unet", 3, encoder_nme="resnet18")


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("unet", {"encoder_name": "resnet9000"}, "encoder_name"),
        ("unet", {"encoder_name": "tu-not_a_timm_model"}, "encoder_name"),
        ("deeplabv3", {"output_stride": 4}, "output_stride"),
        ("pspnet", {"backbone": "vgg16"}, "backbone"),
        ("pspnet", {"output_stride": 32}, "output_stride"),
        ("fcn8s", {"width": 0}, "width"),
        ("fcn8s", {"encoder_weights": "/no/such/file.pth"}, "encoder_weights"),
        ("fcn8s", {"encoder_weights": "places365"}, "encoder_weights"),
    ],
)
def test_bad_option_value_is_named(name: str, options: dict, option: str) -> None:
    with pytest.raises(SegflowError, match=option):
        models.build(name, 3, **options)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_bad_num_classes(num_classes) -> None:
    with pytest.raises(SegflowError, match="num_classes"):
        models.build("fcn8s", num_classes, width=0.125)


@pytest.mark.parametrize("name", models.available())
def test_any_input_size(name: str) -> None:
    """Eval: logits N x K x H x W at an odd size; training: the aux dict exactly when the model has a head."""
    model = tiny(name, num_classes=4).eval()
    x = torch.randn(2, 3, 37, 51)
    with torch.no_grad():
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 37, 51)
        model.train()
        train_out = model(x)
    if models.describe(name).aux:
        assert isinstance(train_out, dict) and set(train_out) == {"out", "aux"}
        assert train_out["out"].shape == train_out["aux"].shape == (2, 4, 37, 51)
    else:
        assert isinstance(train_out, torch.Tensor) and train_out.shape == (2, 4, 37, 51)


@pytest.mark.parametrize("name", models.available())
def test_training_step(name: str) -> None:
    check_training_step(tiny(name))


def test_import_is_idempotent() -> None:
    before = models.available()
    importlib.reload(importlib.import_module("segflow.models"))
    assert models.available() == before


def test_the_architecture_table_is_what_the_family_modules_register() -> None:
    for family in sorted(set(FAMILY_MODULES.values())):
        importlib.import_module(f"segflow.models.{family}")
    registered = {name: entry.builder.__module__.removeprefix("segflow.models.")
                  for name, entry in zoo._REGISTRY.items()}
    assert registered == FAMILY_MODULES


def test_building_a_classic_model_does_not_import_smp() -> None:
    code = ("import sys; from segflow import models; models.build('fcn8s', 3, width=0.0625); "
            "print('segmentation_models_pytorch' in sys.modules, 'segflow.models.smp' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
