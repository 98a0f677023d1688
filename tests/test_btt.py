"""``btt``: 2-core BTT = Monarch, dense vs the defining index formula, padding on primes, counts, init."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.layers.btt import BlockTensorTrain


def make_btt(in_f, out_f, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return deftly.make("btt", in_f, out_f, bias=False, dtype=dtype, **kw)


def btt_from_monarch(mon):
    """The 2-core BTT whose cores are the Monarch factors: core1 = R, core2 = L."""
    k, l, r = mon.nblocks, mon.out_blocks, mon.rank
    p, s = mon.in_part.block, mon.block_out
    btt = make_btt(mon.in_features, mon.out_features, ncores=2, rank=r, in_factors=(k, p),
                   out_factors=(l, s))
    with torch.no_grad():
        btt.core1.copy_(mon.R.reshape(k, 1, l * r, p))  # (n_1, 1, m_1*r, n_2)
        btt.core2.copy_(mon.L.reshape(1, l, s, k * r))  # (1, m_1, m_2, n_1*r)
    return btt


# (in, out, nblocks, out_blocks, rank): exact splits, then ragged ones on both sides
MONARCH_CASES = [(12, 15, 3, 3, 1), (12, 15, 4, 5, 2), (16, 8, 4, 2, 1), (13, 14, 5, 4, 1), (23, 10, 4, 3, 2),
                 (7, 29, 3, 5, 1)]


@pytest.mark.parametrize("case", MONARCH_CASES, ids=str)
def test_two_core_btt_equals_monarch(case):
    in_f, out_f, k, l, r = case
    torch.manual_seed(3)
    mon = deftly.make("monarch", in_f, out_f, bias=False, dtype=torch.float64, nblocks=k, out_blocks=l,
                      rank=r)
    p, s = mon.in_part.block, mon.block_out
    # the same factors on the padded sizes (k*p inputs, l*s outputs): no padding, every entry compared
    full = deftly.make("monarch", k * p, l * s, bias=False, dtype=torch.float64, nblocks=k, out_blocks=l, rank=r)
    with torch.no_grad():
        full.R.copy_(mon.R)
        full.L.copy_(mon.L)
    btt = btt_from_monarch(full)
    assert btt.num_params() == full.num_params() and btt.flops() == full.flops()
    Wb, Wf = btt.to_dense().detach(), full.to_dense().detach()
    # output: BTT row j*s + s'  <->  Monarch row s'*l + j (a relabelling of every row)
    perm = torch.tensor([t * l + j for j in range(l) for t in range(s)])
    torch.testing.assert_close(Wb, Wf[perm], rtol=1e-12, atol=1e-12)
    x = torch.randn(4, k * p, dtype=torch.float64)
    torch.testing.assert_close(btt(x), full(x)[:, perm], rtol=1e-12, atol=1e-12)
    # the ragged Monarch is the padded map on its true features: rows 0..out-1, columns at real_index
    torch.testing.assert_close(mon.to_dense().detach(), Wf[:out_f][:, mon.in_part.real_index],
                               rtol=1e-12, atol=1e-12)

def dense_by_definition(btt) -> torch.Tensor:
    """W[(mu_1..mu_d), (nu_1..nu_d)] = sum over TT ranks of the product of one entry per core."""
    n, m, d, r = btt.in_factors, btt.out_factors, btt.ncores, btt.rank
    ranks = [1] + [r] * (d - 1) + [1]
    cores = [c.detach() for c in btt.cores()]

    def flat(idx, dims):
        return int(sum(i * math.prod(dims[t + 1:]) for t, i in enumerate(idx)))

    W = torch.zeros(math.prod(m), math.prod(n), dtype=cores[0].dtype)
    for mu in itertools.product(*map(range, m)):
        for nu in itertools.product(*map(range, n)):
            total = 0.0
            for ts in itertools.product(*[range(v) for v in ranks[1:-1]]):
                t = (0, *ts, 0)
                prod = 1.0
                for k in range(1, d + 1):
                    a = flat(nu[: d - k], n[: d - k])
                    b = flat(mu[: k - 1], m[: k - 1])
                    row, col = mu[k - 1] * ranks[k] + t[k], nu[d - k] * ranks[k - 1] + t[k - 1]
                    prod *= cores[k - 1][a, b, row, col]
                total += prod
            W[flat(mu, m), flat(nu, n)] = total
    return W[: btt.out_features, : btt.in_features]


@pytest.mark.parametrize("in_f, out_f, kw", [
    (12, 12, {"ncores": 3, "rank": 2, "in_factors": (2, 3, 2), "out_factors": (3, 2, 2)}),
    (11, 7, {"ncores": 3, "rank": 2}),  # primes: default factors pad
    (5, 13, {"ncores": 4, "rank": 1}),
    (10, 9, {"rank": 2, "in_factors": (3, 4), "out_factors": (5, 2)}),  # ncores inferred from factors
], ids=str)
def test_to_dense_and_forward_match_the_definition(in_f, out_f, kw):
    btt = make_btt(in_f, out_f, **kw)
    W = dense_by_definition(btt)
    torch.testing.assert_close(btt.to_dense().detach(), W, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, in_f, dtype=torch.float64)
    torch.testing.assert_close(btt(x), x @ W.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(btt.reference_forward(x), x @ W.T, rtol=1e-10, atol=1e-12)


def test_core_shapes_and_counts_on_primes():
    in_f, out_f = 31, 17
    btt = make_btt(in_f, out_f, ncores=3, rank=2, dtype=torch.float32)
    n, m = btt.in_factors, btt.out_factors
    assert math.prod(n) >= in_f and math.prod(m) >= out_f
    assert math.prod(n) > in_f or math.prod(m) > out_f  # padding really happens
    want = [(n[0] * n[1], 1, m[0] * 2, n[2]), (n[0], m[0], m[1] * 2, n[1] * 2),
            (1, m[0] * m[1], m[2], n[0] * 2)]
    assert [tuple(c.shape) for c in btt.cores()] == want
    assert btt.num_params() == sum(math.prod(s) for s in want) == sum(p.numel() for p in btt.parameters())
    with FlopCounterMode(display=False) as fc:
        y = btt(torch.randn(6, in_f))
    assert y.shape == (6, out_f)
    assert fc.get_total_flops() == btt.flops(batch=6) == 6 * 2 * btt.num_params()


def test_init_output_variance_with_padding_and_rank():
    """E[||W||_F^2] / out = 1/3 for 3 cores, rank 2 and 10 inputs padded to 18."""
    seeds, tot = 150, 0.0
    for s in range(seeds):
        W = make_btt(10, 8, seed=s, ncores=3, rank=2, in_factors=(3, 3, 2), out_factors=(2, 2, 2)).to_dense()
        tot += W.detach().pow(2).sum().item() / 8
    assert abs(tot / seeds * 3 - 1) < 0.1, tot / seeds


def test_defaults_and_hparams_round_trip():
    btt = deftly.make("btt", 1024, 1024)
    assert btt.hparams() == {"ncores": 2, "rank": 1, "in_factors": (32, 32), "out_factors": (32, 32)}
    other = deftly.make("btt", 1024, 1024, **btt.hparams())
    assert [c.shape for c in other.cores()] == [c.shape for c in btt.cores()]
    assert deftly.make("btt", 1, 1, ncores=3, rank=1).hparams()["in_factors"] == (1, 1, 1)


@pytest.mark.parametrize("kw, pattern", [
    ({"ncores": 1}, r"ncores=1 is invalid.*'dense'"),
    ({"in_factors": (3, 5)}, r"in_factors=\(3, 5\) has product 15 < in_features=16"),
    ({"ncores": 3, "out_factors": (2, 5)}, r"out_factors=\(2, 5\) has 2 factors but 3 are needed"),
    ({"in_factors": (4, 4), "out_factors": (2, 2, 4)}, r"out_factors=\(2, 2, 4\) has 3 factors but 2"),
    ({"rank": 0}, r"rank=0 is invalid"),
])
def test_bad_hyperparameters_name_value_and_fix(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        deftly.make("btt", 16, 10, **kw)


def test_module_exports_class():
    assert deftly.get("btt") is BlockTensorTrain
