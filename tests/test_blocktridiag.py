"""``blocktridiag``: dense vs explicitly assembled blocks, padding on primes, inert slots, counts, init."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.layers.blocktridiag import BlockTridiagonal

SHAPES = [(13, 11, 4), (11, 13, 4), (17, 5, 3), (5, 17, 2), (7, 7, 7), (1, 1, 1), (29, 31, 5), (3, 23, 20)]


def make(in_f, out_f, block, seed=0, bias=False):
    torch.manual_seed(seed)
    return deftly.make("blocktridiag", in_f, out_f, bias=bias, dtype=torch.float64, block=block)


def fill_all_slots(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype) + 3.0)


def assembled(layer) -> torch.Tensor:
    """Place each stored block at its grid position (block-columns i-1, i, i+1), then crop."""
    b, R, C = layer.block, layer.nrows, layer.ncols
    full = torch.zeros(R * b, C * b, dtype=layer.weight.dtype)
    w = layer.weight.detach()
    for i in range(R):
        for j in range(C):
            if abs(i - j) <= 1:
                slot = j - i + 1  # 0: left, 1: diagonal, 2: right
                full[i * b:(i + 1) * b, j * b:(j + 1) * b] = w[i, :, slot * b:(slot + 1) * b]
    return full[: layer.out_features, : layer.in_features]


def pattern(in_f, out_f, block) -> torch.Tensor:
    i = torch.arange(out_f).unsqueeze(1) // block
    j = torch.arange(in_f).unsqueeze(0) // block
    return (i - j).abs() <= 1


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_to_dense_matches_assembled_blocks(shape):
    layer = make(*shape)
    fill_all_slots(layer)  # inert slots hold nonzeros too: they must not appear
    dense = layer.to_dense().detach()
    torch.testing.assert_close(dense, assembled(layer), rtol=0, atol=0)
    assert torch.all(dense[~pattern(*shape)] == 0)
    assert torch.all(dense[pattern(*shape)] != 0)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.reference_forward(x), x @ dense.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_padding_slots_inert_and_counted(shape):
    in_f, out_f, b = shape
    layer = make(*shape)
    mask = layer._valid_mask()
    assert torch.all(layer.weight[~mask] == 0), "init leaves padding slots nonzero"
    # every real structural entry is exactly one valid slot
    assert int(mask.sum()) == int(pattern(in_f, out_f, b).sum())
    fill_all_slots(layer)
    x = torch.randn(4, in_f, dtype=torch.float64)
    y = layer(x)
    y.pow(2).sum().backward()
    assert torch.all(layer.weight.grad[~mask] == 0)
    R = -(-out_f // b)
    assert layer.num_params() == 3 * R * b * b == sum(p.numel() for p in layer.parameters())
    layer32 = make(*shape).float()
    with FlopCounterMode(display=False) as fc:
        layer32(torch.randn(3, in_f))
    assert fc.get_total_flops() == layer32.flops(batch=3) == 3 * 6 * R * b * b


def test_wide_layer_ignores_far_columns_and_tall_layer_zero_rows():
    wide = make(20, 4, 2)  # R = 2 block-rows reach block-columns 0..2 = inputs 0..5
    fill_all_slots(wide)
    x = torch.randn(3, 20, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(3, 14, dtype=torch.float64)
    torch.testing.assert_close(wide(x), wide(x2), rtol=0, atol=0)
    tall = make(4, 20, 2)  # C = 2: block-rows >= 3 (outputs >= 6) see no input
    fill_all_slots(tall)
    y = tall(torch.randn(3, 4, dtype=torch.float64))
    assert torch.all(y[:, 6:] == 0) and torch.all(y[:, :6] != 0)


def test_init_every_row_has_linear_variance():
    """E[sum_j W_ij^2] = 1/3 per row, including the edge block-rows that see only two blocks."""
    n, b, seeds = 20, 4, 200
    acc = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        acc += make(n, n, b, seed=s).to_dense().detach().pow(2).sum(1)
    acc /= seeds
    torch.testing.assert_close(acc, torch.full_like(acc, 1 / 3), rtol=0.1, atol=0)


def test_default_block_and_hparams_round_trip():
    layer = deftly.make("blocktridiag", 1024, 1024)
    assert layer.hparams() == {"block": 64} and layer.nrows == 16
    assert deftly.make("blocktridiag", 1, 1).hparams() == {"block": 1}
    assert deftly.make("blocktridiag", 100, 30).hparams() == {"block": 2}


@pytest.mark.parametrize("kw, pattern_", [
    ({"block": 25}, r"block=25 is invalid.*<= 24.*max\(in, out\) = 24"),
    ({"block": 0}, r"block=0 is invalid; it must be >= 1"),
    ({"block": "4"}, r"block must be an int"),
])
def test_bad_block_explains_the_limit(kw, pattern_):
    with pytest.raises((ValueError, TypeError), match=pattern_):
        deftly.make("blocktridiag", 24, 10, **kw)


@pytest.mark.parametrize("in_f, out_f", [(1, 1), (1, 9), (9, 1), (12, 20), (20, 12), (128, 384)])
def test_examples_leave_no_empty_block_row(in_f, out_f):
    for ex in BlockTridiagonal.examples(in_f, out_f):
        layer = deftly.make("blocktridiag", in_f, out_f, **ex)
        assert layer.nrows <= layer.ncols + 1, (in_f, out_f, ex)
