"""The one budget solver (structurize, adapt and the recipes): what it may choose.

Invariants of the defaults (docs/defaults.md): never over the weight budget; within FILL of
the fullest admissible count; among those the structure's preferred shape — divisors over padding, square
Monarch blocks with the rank filling the budget (the published parametrisation), two BTT cores; and the
recipes build exactly the layers that ``structurize`` builds for the same budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deftly
from deftly.surgery.budget import FILL, BudgetError, choose_hparams
from deftly.train.common import budget_linear

SHAPES = [(256, 256), (256, 1024), (1024, 256), (384, 1536), (768, 3072), (100, 37)]
STRUCTURES = ["monarch", "blockdiag", "lowrank", "lrbd", "btt", "kronecker"]


def _admissible_counts(name: str, i: int, o: int, budget: float) -> list[int]:
    cls = deftly.get(name)
    out = []
    for hp in cls.hparam_candidates(i, o):
        try:
            n = cls.param_count(i, o, **hp)
        except (TypeError, ValueError):
            continue
        if n <= budget * i * o:
            out.append(n)
    return out


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_never_over_the_weight_budget_and_nearly_full(name, shape):
    i, o = shape
    try:
        hp = choose_hparams(name, i, o, 0.25)[0]
    except BudgetError:
        assert not _admissible_counts(name, i, o, 0.25)  # refused only when nothing fits
        return
    layer = deftly.make(name, i, o, bias=False, **hp)
    n = layer.num_params()
    assert n == sum(p.numel() for p in layer.parameters())
    assert n <= 0.25 * i * o
    assert n >= FILL * max(_admissible_counts(name, i, o, 0.25))


@pytest.mark.parametrize("shape, want", [
    # sqrt(n) square blocks of sqrt(n), the budget met by the rank (measured better than the 8 blocks)
    ((256, 256), {"nblocks": 16, "out_blocks": 16, "rank": 2}),  # 2 b r n = n^2 / 4: b r = 32
    ((256, 1024), {"nblocks": 16, "out_blocks": 16, "rank": 3}),  # b^2 r (16 + 64) <= 65536: r = 3
    ((1024, 256), {"nblocks": 16, "out_blocks": 16, "rank": 3}),
    ((192, 192), {"nblocks": 12, "out_blocks": 12, "rank": 2}),  # sqrt(192) = 13.9: 12 divides, 14 does not
    ((1024, 1024), {"nblocks": 32, "out_blocks": 32, "rank": 4}),  # b r = 128
], ids=str)
def test_monarch_square_blocks_dividing_the_sizes_rank_fills(shape, want):
    assert choose_hparams("monarch", *shape, 0.25)[0] == want


@pytest.mark.parametrize("shape", [(384, 1536), (768, 3072), (3072, 768), (4096, 11008)], ids=str)
def test_monarch_never_pads_when_a_common_divisor_fits(shape):
    i, o = shape
    hp = choose_hparams("monarch", i, o, 0.25)[0]
    assert hp["nblocks"] == hp["out_blocks"] and i % hp["nblocks"] == 0 and o % hp["out_blocks"] == 0


@pytest.mark.parametrize("shape", [(256, 256), (256, 1024), (384, 1536), (768, 3072)], ids=str)
def test_blockdiag_quarter_budget_is_four_exact_blocks(shape):
    """25% of the weight is exactly 4 blocks; counting the bias in the budget used to push it to 5 (padding)."""
    assert choose_hparams("blockdiag", *shape, 0.25)[0] == {"nblocks": 4}


@pytest.mark.parametrize("shape", [(256, 256), (256, 1024), (384, 1536)], ids=str)
def test_btt_prefers_two_cores(shape):
    assert choose_hparams("btt", *shape, 0.25)[0]["ncores"] == 2


@pytest.mark.parametrize("name", ["monarch", "blockdiag", "lowrank", "btt", "lrbd"])
def test_recipes_and_structurize_build_the_same_layer(name):
    """One solver: a user's model structurized at budget 0.25 gets the hyperparameters the recipes use."""
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.Linear(256, 7))
    deftly.structurize(model, deftly.StructureConfig(structure=name, target_modules=["0", "2"], budget=0.25,
                                                     init="random"))
    for idx, (i, o) in ((0, (256, 1024)), (2, (1024, 256))):
        assert model[idx].hparams() == budget_linear(name, i, o, 0.25).hparams()
    assert isinstance(model[3], nn.Linear)


def test_shape_score_orders_padding_last():
    m = deftly.get("monarch")
    assert m.shape_score(256, 256, nblocks=16, out_blocks=16, rank=2) == 0.0
    assert m.shape_score(256, 256, nblocks=28, out_blocks=28, rank=1) > m.shape_score(256, 256, nblocks=16,
                                                                                      out_blocks=16, rank=2)
    assert m.shape_score(256, 1024, nblocks=11, out_blocks=3, rank=11) > 1.0  # lopsided and padded
    b = deftly.get("blockdiag")
    assert b.shape_score(256, 256, nblocks=4) == 0.0 and b.shape_score(256, 256, nblocks=5) > 0
    assert math.isclose(deftly.get("lowrank").shape_score(256, 256, rank=3), 0.0)


def test_budget_error_names_the_layer_and_the_smallest_count():
    with pytest.raises(BudgetError, match=r"btt 97->31.*smallest candidate"):
        choose_hparams("btt", 97, 31, 0.25)
    assert issubclass(BudgetError, ValueError)


def test_bias_is_outside_the_budget_but_kept():
    """The budget is on the weight; a layer with bias gets the same shape as one without."""
    assert choose_hparams("lowrank", 256, 256, 0.25, bias=True) == choose_hparams("lowrank", 256, 256, 0.25,
                                                                                bias=False)
    layer = budget_linear("lowrank", 256, 256, 0.25)
    assert layer.bias is not None and layer.num_params() == 32 * 512 + 256
    torch.testing.assert_close(layer(torch.zeros(1, 256)), layer.bias.detach()[None])
