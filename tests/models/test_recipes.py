"""Training recipes: each architecture's own, params.yaml's overrides, and the optimizer's parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segflow import models
from segflow.config import RecipeParams, parse_params
from segflow.errors import SegflowError
from segflow.models.recipes import FIELDS, Recipe
from segflow.training.optim import build_optimizer, build_scheduler

CPU = torch.device("cpu")


def test_every_architecture_has_a_cited_recipe_that_params_yaml_can_set_field_by_field():
    for name in models.available():
        recipe = models.recipe(name)
        assert recipe.source and recipe.lr > 0, name
    assert set(RecipeParams.model_fields) == set(FIELDS)  # params.yaml has a key for every field, and no other
    assert parse_params({}).train.overrides() == {}  # params.yaml's defaults keep every recipe as it is


def test_overrides_apply_in_order_train_then_the_model_and_unset_keys_keep_the_recipe():
    params = parse_params({"train": {"lr": 0.05, "weight_decay": 0.0},
                           "models": {"fcn8s": {"width": 0.25, "recipe": {"lr": 0.002, "optimizer": "sgd"}}}})
    options = dict(params.models["fcn8s"])
    recipe = models.recipe("fcn8s", params.train.overrides(), options.pop("recipe"))
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay) == ("sgd", 0.002, 0.0)
    assert recipe.bias_lr_mult == models.recipe("fcn8s").bias_lr_mult == 2.0  # the paper's, not overridden
    assert options == {"width": 0.25}  # the builder never sees the recipe
    assert models.recipe("pspnet", params.train.overrides()).lr == 0.05
    assert models.recipe("pspnet", parse_params({}).train.overrides()) == models.recipe("pspnet")


def test_a_misspelt_or_invalid_recipe_key_is_named():
    with pytest.raises(SegflowError, match=r"models: fcn8s\.recipe\.lrr: unknown key"):
        parse_params({"models": {"fcn8s": {"recipe": {"lrr": 0.1}}}})
    with pytest.raises(SegflowError, match=r"fcn8s\.recipe\.optimizer"):
        parse_params({"models": {"fcn8s": {"recipe": {"optimizer": "adam"}}}})


class _Net(nn.Module):
    """An encoder (conv + batch norm) and a new classifier, as segflow's models are."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.classifier = nn.Conv2d(4, 2, 1)

    def encoder_module(self) -> nn.Module:
        return self.encoder


def _groups(optimizer: torch.optim.Optimizer, net: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in net.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_parameter_groups_follow_the_recipe():
    recipe = Recipe(source="test", optimizer="sgd", lr=0.01, weight_decay=5e-4, new_layers_lr_mult=10.0,
                    bias_lr_mult=2.0, norm_bias_decay=False)
    net = _Net()
    groups = _groups(build_optimizer(recipe, net, CPU, encoder_loaded=True), net)
    assert groups == {
        "encoder.0.weight": (0.01, 5e-4), "encoder.0.bias": (0.02, 0.0),      # biases: 2x, no decay
        "encoder.1.weight": (0.01, 0.0), "encoder.1.bias": (0.02, 0.0),       # batch norm: no decay
        "classifier.weight": (0.1, 5e-4), "classifier.bias": (0.2, 0.0),      # new layers: 10x
    }
    # From random init every layer is new: no 10x, and weight decay everywhere when the recipe says so.
    plain = _groups(build_optimizer(Recipe(source="test", optimizer="adamw", lr=0.001, weight_decay=1e-4), net, CPU,
                                    encoder_loaded=False), net)
    assert set(plain.values()) == {(0.001, 1e-4)}


def test_poly_schedule_with_warm_up_scales_every_group_alike():
    net = _Net()
    recipe = Recipe(source="test", optimizer="sgd", lr=0.1, weight_decay=0.0, warmup_steps=4, bias_lr_mult=2.0)
    optimizer = build_optimizer(recipe, net, CPU, encoder_loaded=False)
    scheduler = build_scheduler(recipe, optimizer, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    weights, biases = zip(*seen, strict=True)
    assert weights[0] == pytest.approx(0.1 * 0.1)                             # warm-up starts at lr / 10
    assert weights[2] == pytest.approx(0.1 * (1 - 2 / 10) ** 0.9 * (0.1 + 0.9 * 2 / 4))
    assert weights[5] == pytest.approx(0.1 * (1 - 5 / 10) ** 0.9)            # then poly alone
    assert biases == pytest.approx([2 * w for w in weights])
