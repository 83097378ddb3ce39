"""FC-DenseNet 56/67/103 (Jégou et al. 2017)."""

from __future__ import annotations

import pytest
import torch
from zoo_testing import count_params, tiny

from segflow import models
from segflow.models.fcdensenet import DenseBlock


@pytest.mark.parametrize(
    ("name", "paper", "rel"),
    # The paper's 56 figure (1.5M) is loose: the faithful layout has 1.38M trainable parameters (1.40M with
    # the BN statistics, which the Lasagne count includes); 67 and 103 agree within 1%.
    [("fcdensenet56", 1.5e6, 0.1), ("fcdensenet67", 3.5e6, 0.015), ("fcdensenet103", 9.4e6, 0.01)],
)
def test_param_count_matches_paper(name: str, paper: float, rel: float) -> None:
    assert count_params(name, 11) == pytest.approx(paper, rel=rel)


@pytest.mark.parametrize(
    ("name", "growth", "layers"),
    [("fcdensenet56", 12, [4] * 11), ("fcdensenet67", 16, [5] * 11),
     ("fcdensenet103", 16, [4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4])],
)
def test_block_layout(name: str, growth: int, layers: list[int]) -> None:
    assert models.describe(name).default_options["growth_rate"] == growth
    with torch.device("meta"):
        model = models.build(name, 11)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert [len(b.layers) for b in blocks] == layers
    assert all(layer[2].out_channels == growth for b in blocks for layer in b.layers)
    assert model.encoder.first_conv.out_channels == 48


def test_upsampling_path_carries_only_new_features() -> None:
    model = tiny("fcdensenet103")
    blocks = list(model.up_blocks)
    assert all(b.new_only for b in blocks[:-1]) and not blocks[-1].new_only and model.bottleneck.new_only
    k = 4
    assert model.transitions_up[0].in_channels == 15 * k  # bottleneck's new features only
