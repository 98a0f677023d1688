"""``kronecker``: dense vs ``torch.kron``, both contraction orders, padding on primes, counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.core.partition import balanced_factors
from deftly.layers.kronecker import Kronecker

# (in, out, in_factors, out_factors, rank); None = balanced default
CASES = [(16, 16, None, None, 1), (13, 17, None, None, 2), (17, 13, (6, 3), (7, 2), 3),
         (12, 20, (4, 3), (5, 4), 1), (12, 20, (3, 4), (4, 5), 2), (7, 11, (7, 1), (1, 11), 1),
         (1, 1, None, None, 1), (1, 9, (1, 1), (3, 3), 1), (10, 10, (4, 4), (2, 8), 2)]


def make(in_f, out_f, fi, fo, rank, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    kw = {"rank": rank}
    if fi is not None:
        kw["in_factors"] = fi
    if fo is not None:
        kw["out_factors"] = fo
    return deftly.make("kronecker", in_f, out_f, bias=False, dtype=dtype, **kw)


def kron_sum(layer) -> torch.Tensor:
    W = sum(torch.kron(layer.A[r], layer.B[r]) for r in range(layer.rank))
    return W.detach()[: layer.out_features, : layer.in_features]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_to_dense_and_forward_match_torch_kron(case):
    layer = make(*case)
    W = kron_sum(layer)
    torch.testing.assert_close(layer.to_dense().detach(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ W.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.reference_forward(x), x @ W.T, rtol=1e-10, atol=1e-12)


def test_both_contraction_orders_are_used_and_counted():
    # 12x20 with (4,3)x(5,4): A first is cheaper; swapped factors: B first is cheaper
    a_first = make(12, 20, (4, 3), (5, 4), 2, dtype=torch.float32)
    b_first = make(12, 20, (3, 4), (4, 5), 2, dtype=torch.float32)
    assert not Kronecker._b_first(a_first.in_factors, a_first.out_factors)
    assert Kronecker._b_first(b_first.in_factors, b_first.out_factors)
    for layer in (a_first, b_first):
        (i1, i2), (o1, o2), r = layer.in_factors, layer.out_factors, layer.rank
        cheapest = min(2 * r * i1 * o2 * (i2 + o1), 2 * r * i2 * o1 * (i1 + o2))
        assert layer.flops() == cheapest
        with FlopCounterMode(display=False) as fc:
            layer(torch.randn(7, 12))
        assert fc.get_total_flops() == 7 * cheapest


def test_prime_sizes_pad_inside_and_count_padding():
    in_f, out_f = 13, 17
    layer = make(in_f, out_f, None, None, 1, dtype=torch.float32)
    fi, fo = balanced_factors(13, 2), balanced_factors(17, 2)
    assert layer.in_factors == fi and layer.out_factors == fo
    assert fi[0] * fi[1] > in_f and fo[0] * fo[1] > out_f  # both sides really padded
    assert layer.num_params() == fo[0] * fi[0] + fo[1] * fi[1] == sum(p.numel() for p in layer.parameters())
    with FlopCounterMode(display=False) as fc:
        y = layer(torch.randn(4, in_f))
    assert y.shape == (4, out_f)
    assert fc.get_total_flops() == layer.flops(batch=4)
    # the layer is the full Kronecker map applied to the zero-padded input, truncated to out
    x = torch.randn(3, in_f)
    full = sum(torch.kron(layer.A[r], layer.B[r]) for r in range(layer.rank)).detach()
    xp = torch.nn.functional.pad(x, (0, fi[0] * fi[1] - in_f))
    torch.testing.assert_close(layer(x), (xp @ full.T)[:, :out_f], rtol=1e-5, atol=1e-6)


def test_init_output_variance_with_heavy_padding():
    """E[||W||_F^2] / out = 1/3 even when the factors pad 10 inputs to 16 (the g correction)."""
    seeds = 300
    for fi, fo, r in [((4, 4), (4, 3), 1), ((4, 4), (2, 6), 3)]:
        tot = 0.0
        for s in range(seeds):
            tot += make(10, 12, fi, fo, r, seed=s).to_dense().detach().pow(2).sum().item() / 12
        assert abs(tot / seeds / (1 / 3) - 1) < 0.08, (fi, fo, r, tot / seeds)


def test_hparams_round_trip_and_defaults():
    layer = deftly.make("kronecker", 1024, 4096)
    assert layer.hparams() == {"in_factors": (32, 32), "out_factors": (64, 64), "rank": 1}
    again = deftly.make("kronecker", 1024, 4096, in_factors=[32, 32], out_factors=[64, 64])
    assert again.hparams() == layer.hparams()


@pytest.mark.parametrize("kw, pattern", [
    ({"in_factors": (3, 5)}, r"in_factors=\(3, 5\) has product 15 < in_features=16.*in_factors=\(4, 4\)"),
    ({"out_factors": (2, 3)}, r"out_factors=\(2, 3\) has product 6 < out_features=10.*out_factors="),
    ({"in_factors": (2, 2, 4)}, r"in_factors=\(2, 2, 4\) has 3 factors but 2 are needed"),
    ({"in_factors": (0, 16)}, r"in_factors\[0\]=0 is invalid"),
    ({"in_factors": 16}, r"in_factors=16 must be a tuple of 2 ints"),
    ({"rank": 0}, r"rank=0 is invalid"),
])
def test_bad_factors_name_value_and_fix(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        deftly.make("kronecker", 16, 10, **kw)
