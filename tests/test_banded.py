"""``banded``: layout, independent dense constructions, inert corner slots, init, counts and errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.layers.banded import Banded

SHAPES = [(13, 13, 2, 3), (7, 13, 5, 1), (13, 7, 0, 4), (1, 5, 4, 0), (5, 1, 0, 4), (11, 17, 6, 0),
          (37, 40, 20, 15)]  # (in, out, lower, upper); the last has 36 diagonals: two unfold chunks


def make(in_f, out_f, lower, upper, seed=0, bias=False):
    torch.manual_seed(seed)
    return deftly.make("banded", in_f, out_f, bias=bias, dtype=torch.float64, lower=lower, upper=upper)


def fill_all_slots(layer, seed=1):
    """Overwrite every stored slot, corners included, with nonzero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype) + 3.0)


def scipy_banded(layer) -> np.ndarray:
    """The (out, in) matrix from scipy.sparse.diags, one in-rectangle diagonal per offset."""
    out_f, in_f, lo = layer.out_features, layer.in_features, layer.lower
    w = layer.weight.detach().numpy()
    diags, offsets = [], []
    for d in range(w.shape[0]):
        k = d - lo
        i0, i1 = max(0, -k), min(out_f, in_f - k)
        if i1 > i0:
            diags.append(w[d, i0:i1])
            offsets.append(k)
    return scipy.sparse.diags(diags, offsets, shape=(out_f, in_f)).toarray()


def masked_dense(layer) -> torch.Tensor:
    """Gather weight[j - i + lower, i] for every (i, j), then mask with triu/tril."""
    out_f, in_f, lo, up = layer.out_features, layer.in_features, layer.lower, layer.upper
    i = torch.arange(out_f).unsqueeze(1)
    j = torch.arange(in_f).unsqueeze(0)
    d = (j - i + lo).clamp(0, lo + up)
    mask = torch.ones(out_f, in_f, dtype=torch.bool).triu(-lo).tril(up)
    return layer.weight.detach()[d, i.expand_as(d)] * mask


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_to_dense_matches_scipy_and_masked_dense(shape):
    layer = make(*shape)
    fill_all_slots(layer)  # corners hold nonzeros: they must not show up anywhere
    dense = layer.to_dense().detach()
    np.testing.assert_allclose(dense.numpy(), scipy_banded(layer), rtol=0, atol=0)
    torch.testing.assert_close(dense, masked_dense(layer), rtol=0, atol=0)
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.reference_forward(x), x @ dense.T, rtol=1e-12, atol=1e-12)


def test_tridiagonal_second_difference_stencil():
    """The finite-difference use: weight rows are the diagonals of offsets -lower..upper."""
    n = 64
    layer = make(n, n, 1, 1)
    with torch.no_grad():
        layer.weight[0].fill_(1.0)   # offset -1
        layer.weight[1].fill_(-2.0)  # offset 0
        layer.weight[2].fill_(1.0)   # offset +1
    ref = scipy.sparse.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(n, n)).toarray()
    np.testing.assert_array_equal(layer.to_dense().detach().numpy(), ref)
    h = 2 * np.pi / (n + 1)
    t = torch.arange(1, n + 1, dtype=torch.float64) * h
    u = torch.sin(t)  # zero at both (implicit) boundary points
    with torch.no_grad():
        d2 = layer(u) / h**2
    torch.testing.assert_close(d2, -torch.sin(t), rtol=0, atol=2e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_corner_slots_are_inert(shape):
    layer = make(*shape)
    mask = layer._valid_mask()
    assert torch.all(layer.weight[~mask] == 0), "init leaves corner slots nonzero"
    assert int(mask.sum()) == Banded.band_nonzeros(layer.in_features, layer.out_features,
                                                   lower=layer.lower, upper=layer.upper)
    assert int(mask.sum()) == int(torch.ones(layer.out_features, layer.in_features).triu(-layer.lower)
                                  .tril(layer.upper).sum())
    fill_all_slots(layer)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    y = layer(x)
    y.pow(2).sum().backward()
    assert torch.all(layer.weight.grad[~mask] == 0)
    assert torch.any(layer.weight.grad[mask] != 0)
    with torch.no_grad():
        layer.weight[~mask] = -7.0
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flop_counter_sees_every_diagonal(shape):
    in_f, out_f, lo, up = shape
    layer = make(*shape).float()
    with FlopCounterMode(display=False) as fc:
        layer(torch.randn(3, in_f))
    assert fc.get_total_flops() == layer.flops(batch=3) == 3 * 2 * (lo + up + 1) * out_f


def test_counts_include_corners_and_padding():
    layer = make(13, 7, 0, 4, bias=True)
    ndiag = 0 + 4 + 1
    assert layer.num_params() == ndiag * 7 + 7 == sum(p.numel() for p in layer.parameters())
    assert Banded.band_nonzeros(13, 7, lower=0, upper=4) == 7 * 5  # every row fully inside
    assert Banded.band_nonzeros(5, 5, lower=1, upper=1) == 13


def test_tall_layer_rows_beyond_band_are_zero():
    layer = make(4, 10, 2, 1)  # rows i >= in + lower = 6 have no entries
    fill_all_slots(layer)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = layer(x)
    assert torch.all(y[:, 6:] == 0) and torch.all(y[:, :6] != 0)


def test_init_every_row_has_linear_variance():
    """Per row, E[sum_j W_ij^2] = 1/3 whatever the row's number of band entries (edges have fewer)."""
    n, seeds = 24, 300
    acc = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        acc += make(n, n, 5, 3, seed=s).to_dense().detach().pow(2).sum(1)
    acc /= seeds
    torch.testing.assert_close(acc, torch.full_like(acc, 1 / 3), rtol=0.12, atol=0)


def test_defaults_are_tridiagonal_clipped():
    assert deftly.make("banded", 10, 10).hparams() == {"lower": 1, "upper": 1}
    assert deftly.make("banded", 1, 1).hparams() == {"lower": 0, "upper": 0}
    assert deftly.make("banded", 1, 6).hparams() == {"lower": 1, "upper": 0}


@pytest.mark.parametrize("kw, pattern", [
    ({"lower": 8}, r"lower=8 is invalid.*<= 7.*out - 1 = 7"),
    ({"upper": 12}, r"upper=12 is invalid.*<= 11.*in - 1 = 11"),
    ({"lower": -1}, r"lower=-1 is invalid; it must be >= 0"),
    ({"upper": 2.0}, r"upper must be an int"),
])
def test_bad_bandwidths_explain_the_limit(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        deftly.make("banded", 12, 8, **kw)


@pytest.mark.parametrize("in_f, out_f", [(1, 1), (1, 9), (9, 1), (12, 20), (20, 12), (31, 31)])
def test_examples_reach_every_row(in_f, out_f):
    for ex in Banded.examples(in_f, out_f):
        layer = deftly.make("banded", in_f, out_f, **ex)
        assert layer._valid_mask().any(0).all(), (in_f, out_f, ex)
