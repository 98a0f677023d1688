"""Closed-form projections of banded, blocktridiag, kronecker and btt (``_project_closed_form``) and their
``hparam_candidates``, checked against independent computations (numpy SVD / least squares, torch.kron,
explicit masks) rather than against the code under test."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import deftly
from deftly.core.projection import Calibration, relative_error

NAMES = ["banded", "blocktridiag", "kronecker", "btt"]
SHAPES = [(16, 16), (12, 20), (20, 12), (13, 7)]
# explicit factorisations (the registry examples use the balanced defaults): padded and exact
EXTRA = {
    "kronecker": [(13, 7, {"in_factors": (4, 4), "out_factors": (3, 3), "rank": 2}),
                  (24, 30, {"in_factors": (6, 4), "out_factors": (5, 6), "rank": 3})],
    "btt": [(64, 64, {"ncores": 3, "rank": 2, "in_factors": (4, 4, 4), "out_factors": (4, 4, 4)}),
            (13, 7, {"ncores": 3, "rank": 2, "in_factors": (3, 2, 3), "out_factors": (2, 2, 2)}),
            (24, 30, {"ncores": 2, "rank": 2, "in_factors": (5, 5), "out_factors": (4, 8)})],
}


def registry_cases(names=NAMES, shapes=SHAPES):
    out = []
    for name in names:
        for in_f, out_f in shapes:
            for hp in deftly.get(name).examples(in_f, out_f):
                out.append((name, in_f, out_f, hp))
        out += [(name, i, o, hp) for i, o, hp in EXTRA.get(name, [])]
    return out


CASES = registry_cases()


def case_id(case) -> str:
    name, in_f, out_f, hp = case
    return f"{name}-{in_f}x{out_f}-" + "-".join(f"{k}{v}" for k, v in hp.items())


def fresh(name, in_f, out_f, hp, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return deftly.make(name, in_f, out_f, bias=False, dtype=dtype, **hp)


def gaussian(out_f, in_f, seed=1):
    return torch.randn(out_f, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def support_mask(name, in_f, out_f, hp) -> torch.Tensor:
    """The structural support, from the definitions (not from the layer)."""
    i = torch.arange(out_f).unsqueeze(1)
    j = torch.arange(in_f).unsqueeze(0)
    if name == "banded":
        return (j - i >= -hp["lower"]) & (j - i <= hp["upper"])
    b = hp["block"]
    return (i // b - j // b).abs() <= 1


def correlated_inputs(in_f, n=256, seed=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, in_f, dtype=torch.float64, generator=g)
    mix = torch.randn(in_f, in_f, dtype=torch.float64, generator=g) / math.sqrt(in_f)
    scales = torch.logspace(0, -1, in_f, dtype=torch.float64)
    return (z * scales) @ mix + 0.5 * z[:, :1]  # strongly correlated, unequal scales, a shared factor


# ---------------------------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_structured_matrix_is_recovered(case):
    name, in_f, out_f, hp = case
    src = fresh(name, in_f, out_f, hp, seed=3)
    W = src.to_dense().detach()
    # float64 target: the closed form must detect it is exact (no refinement needed)
    probe = fresh(name, in_f, out_f, hp)
    assert probe._project_closed_form(W) is True
    assert relative_error(W, probe.to_dense()) < 1e-10
    # and into a float32 layer through the public API
    layer, err = deftly.project(W, name, dtype=torch.float32, **hp)
    assert layer.weight_dtype == torch.float32
    assert err < 1e-6
    assert relative_error(W, layer.to_dense()) < 1e-6
    # a float32 target (rounded, so no longer exactly structured for the factorised ones): the closed
    # form alone (no refinement) is within float32 resolution
    _, err32 = deftly.project(W.float(), name, steps=0, **hp)
    assert err32 < 1e-6


@pytest.mark.parametrize("name", ["banded", "blocktridiag"])
def test_dead_slots_stay_zero(name):
    for in_f, out_f in SHAPES:
        for hp in deftly.get(name).examples(in_f, out_f):
            layer = fresh(name, in_f, out_f, hp)
            layer._project_closed_form(gaussian(out_f, in_f), None)
            assert (layer.weight[~layer._valid_mask()] == 0).all()
            X = correlated_inputs(in_f)
            layer._project_closed_form(gaussian(out_f, in_f), Calibration(X).cov)
            assert (layer.weight[~layer._valid_mask()] == 0).all()


# ---------------------------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_error_never_exceeds_the_zero_baseline(case):
    name, in_f, out_f, hp = case
    W = gaussian(out_f, in_f)
    probe = fresh(name, in_f, out_f, hp)
    probe._project_closed_form(W)  # the closed form by itself, without the driver's zero fallback
    closed = relative_error(W, probe.to_dense())
    assert closed <= 1.0 + 1e-12  # the zero matrix has relative error exactly 1
    _, err = deftly.project(W, name, steps=5, **hp)
    assert 0 <= err <= closed + 1e-12
    if name in ("banded", "blocktridiag"):  # = the error of the masked matrix, exactly
        M = support_mask(name, in_f, out_f, hp)
        assert err == pytest.approx(float((W * ~M).norm() / W.norm()), abs=1e-12)


def vlp_reference(W: np.ndarray, in_factors, out_factors):
    """Independent Van Loan–Pitsianis: R(W) by explicit loops, numpy SVD."""
    (i1, i2), (o1, o2) = in_factors, out_factors
    R = np.zeros((o1 * i1, o2 * i2))
    for a in range(o1):
        for b in range(o2):
            for c in range(i1):
                for d in range(i2):
                    R[a * i1 + c, b * i2 + d] = W[a * o2 + b, c * i2 + d]
    return np.linalg.svd(R)


@pytest.mark.parametrize("in_f,out_f,in_factors,out_factors", [
    (16, 16, (4, 4), (4, 4)), (12, 20, (3, 4), (5, 4)), (20, 12, (10, 2), (2, 6)), (6, 6, (1, 6), (6, 1))])
def test_kronecker_matches_van_loan_pitsianis(in_f, out_f, in_factors, out_factors):
    W = gaussian(out_f, in_f, seed=7)
    U, s, Vt = vlp_reference(W.numpy(), in_factors, out_factors)
    (i1, i2), (o1, o2) = in_factors, out_factors
    prev = math.inf
    for rank in range(1, min(len(s), 4) + 1):
        layer, err = deftly.project(W, "kronecker", in_factors=in_factors, out_factors=out_factors, rank=rank)
        best = math.sqrt(float((s[rank:] ** 2).sum())) / float(np.linalg.norm(W.numpy()))
        assert err == pytest.approx(best, abs=1e-10)
        assert err <= prev + 1e-12
        prev = err
        # the layer's dense weight is sum_r A_r (x) B_r (torch.kron) and equals the numpy optimum
        dense = sum(torch.kron(layer.A[t], layer.B[t]) for t in range(rank)).detach()
        torch.testing.assert_close(layer.to_dense().detach(), dense, rtol=0, atol=1e-12)
        ref = sum(s[t] * np.kron(U[:, t].reshape(o1, i1), Vt[t].reshape(o2, i2)) for t in range(rank))
        np.testing.assert_allclose(layer.to_dense().detach().numpy(), ref, atol=1e-10)


def test_kronecker_rank1_beats_brute_force_search():
    # 4x4 = (2x2) (x) (2x2): no rank-1 candidate from a random search does better than the projection
    W = gaussian(4, 4, seed=11)
    hp = {"in_factors": (2, 2), "out_factors": (2, 2), "rank": 1}
    _, err = deftly.project(W, "kronecker", **hp)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20000, 2, 2, dtype=torch.float64, generator=g)
    B = torch.randn(20000, 2, 2, dtype=torch.float64, generator=g)
    K = torch.einsum("nac,nbd->nabcd", A, B).reshape(-1, 4, 4)
    # best scaling of each random A (x) B, then the best of all
    scale = (K * W).sum((1, 2)) / K.pow(2).sum((1, 2))
    brute = ((W - scale.view(-1, 1, 1) * K).norm(dim=(1, 2)) / W.norm()).min()
    assert err <= float(brute) + 1e-12


def test_kronecker_padding_is_free():
    # padded factors (13 -> 4x4, 7 -> 3x3): the error counts only the true entries; it is never worse
    # than the zero-filled Van Loan-Pitsianis solution restricted to them
    W = gaussian(7, 13, seed=5)
    hp = {"in_factors": (4, 4), "out_factors": (3, 3), "rank": 2}
    Wp = np.zeros((9, 16))
    Wp[:7, :13] = W.numpy()
    U, s, Vt = vlp_reference(Wp, (4, 4), (3, 3))
    zero_filled = sum(s[t] * np.kron(U[:, t].reshape(3, 4), Vt[t].reshape(3, 4)) for t in range(2))[:7, :13]
    base = float(np.linalg.norm(W.numpy() - zero_filled) / np.linalg.norm(W.numpy()))
    _, err = deftly.project(W, "kronecker", **hp)
    assert err <= base + 1e-12
    assert err < base * 0.999  # the padded slots are used


def slice_svd_reference(W: np.ndarray, in_factors, out_factors, rank):
    """Independent 2-core BTT optimum: Eckart-Young on every (m1, n1) slice of the zero-padded W, true
    entries only (a slice's padding is whole rows/columns)."""
    (n1, n2), (m1, m2) = in_factors, out_factors
    out_f, in_f = W.shape
    total = 0.0
    for b1 in range(m1):
        for a in range(n1):
            rows = [b1 * m2 + t for t in range(m2) if b1 * m2 + t < out_f]
            cols = [a * n2 + t for t in range(n2) if a * n2 + t < in_f]
            if rows and cols:
                s = np.linalg.svd(W[np.ix_(rows, cols)], compute_uv=False)
                total += float((s[rank:] ** 2).sum())
    return math.sqrt(total) / float(np.linalg.norm(W))


@pytest.mark.parametrize("in_f,out_f,in_factors,out_factors,rank", [
    (16, 16, (4, 4), (4, 4), 1), (16, 16, (4, 4), (4, 4), 2), (24, 30, (5, 5), (4, 8), 2),
    (13, 7, (4, 4), (3, 3), 2), (20, 12, (2, 10), (2, 6), 3)])
def test_btt_two_cores_matches_per_slice_svd(in_f, out_f, in_factors, out_factors, rank):
    W = gaussian(out_f, in_f, seed=9)
    hp = {"ncores": 2, "rank": rank, "in_factors": in_factors, "out_factors": out_factors}
    layer = fresh("btt", in_f, out_f, hp)
    assert layer._project_closed_form(W) is True
    _, err = deftly.project(W, "btt", **hp)
    assert err == pytest.approx(slice_svd_reference(W.numpy(), in_factors, out_factors, rank), abs=1e-10)
    assert relative_error(W, layer.to_dense()) == pytest.approx(err, abs=1e-10)


def test_btt_three_cores_refinement_never_hurts():
    W = gaussian(64, 64, seed=4)
    hp = {"ncores": 3, "rank": 2, "in_factors": (4, 4, 4), "out_factors": (4, 4, 4)}
    probe = fresh("btt", 64, 64, hp)
    assert probe._project_closed_form(W) is False  # sequential SVD: a start, not the optimum
    closed = relative_error(W, probe.to_dense())
    _, err0 = deftly.project(W, "btt", steps=0, **hp)
    assert err0 == pytest.approx(closed, abs=1e-12)
    _, err = deftly.project(W, "btt", steps=10, **hp)
    assert err <= closed + 1e-12
    assert closed < 1.0
    # the sequential SVD is much better than a random start
    rnd = relative_error(W, fresh("btt", 64, 64, hp).to_dense())
    assert closed < rnd


# ---------------------------------------------------------------------------------------------- calibration
def lstsq_rows(W: np.ndarray, X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row by row: min ||X (w - s)^T|| over s supported on mask's row (numpy lstsq)."""
    S = np.zeros_like(W)
    for i in range(W.shape[0]):
        J = np.nonzero(mask[i])[0]
        if J.size:
            S[i, J] = np.linalg.lstsq(X[:, J], X @ W[i], rcond=None)[0]
    return S


@pytest.mark.parametrize("case", registry_cases(["banded", "blocktridiag"]), ids=case_id)
def test_fixed_support_calibrated_is_exact_least_squares(case):
    name, in_f, out_f, hp = case
    W, X = gaussian(out_f, in_f), correlated_inputs(in_f)
    cov = Calibration(X).cov
    layer = fresh(name, in_f, out_f, hp)
    assert layer._project_closed_form(W, cov) is True
    ref = lstsq_rows(W.numpy(), X.numpy(), support_mask(name, in_f, out_f, hp).numpy())
    np.testing.assert_allclose(layer.to_dense().detach().numpy(), ref, atol=1e-8)
    # and the public path reports that optimum
    _, err = deftly.project(W, name, calibration=X, **hp)
    best = float(np.linalg.norm((W.numpy() - ref) @ X.numpy().T) / np.linalg.norm(W.numpy() @ X.numpy().T))
    assert err == pytest.approx(best, abs=1e-9)


def test_banded_calibrated_with_singular_covariance():
    # fewer samples than band columns: C_JJ is singular, any minimiser will do; it must be one
    in_f = out_f = 16
    hp = {"lower": 4, "upper": 4}
    W, X = gaussian(out_f, in_f), correlated_inputs(in_f, n=5)
    layer = fresh("banded", in_f, out_f, hp)
    assert layer._project_closed_form(W, Calibration(X).cov) is True
    S = layer.to_dense().detach().numpy()
    ref = lstsq_rows(W.numpy(), X.numpy(), support_mask("banded", in_f, out_f, hp).numpy())
    Xn, Wn = X.numpy(), W.numpy()
    assert np.linalg.norm((Wn - S) @ Xn.T) == pytest.approx(np.linalg.norm((Wn - ref) @ Xn.T), rel=1e-7,
                                                            abs=1e-10)
    assert np.isfinite(S).all() and np.abs(S).max() < 1e3 * np.abs(Wn).max()


CAL_CASES = [c for c in CASES if (c[1], c[2]) in ((16, 16), (13, 7)) or c[0] in ("kronecker", "btt")
             and (c[1], c[2]) == (24, 30)]


@pytest.mark.parametrize("case", CAL_CASES, ids=case_id)
def test_calibrated_output_error_not_worse_than_plain(case):
    name, in_f, out_f, hp = case
    W, X = gaussian(out_f, in_f), correlated_inputs(in_f)
    cov = Calibration(X).cov
    plain, _ = deftly.project(W, name, steps=10, **hp)
    plain_out = relative_error(W, plain.to_dense(), cov)
    cal, err = deftly.project(W, name, calibration=X, steps=10, **hp)
    assert err == pytest.approx(relative_error(W, cal.to_dense(), cov), abs=1e-12)
    assert err <= plain_out + 1e-12
    if name in ("banded", "blocktridiag") and not support_mask(name, in_f, out_f, hp).all():
        assert err < plain_out  # correlated inputs: the exact whitened solution is strictly better


# ---------------------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("name", NAMES)
def test_candidates_construct_and_counts_match(name):
    cls = deftly.get(name)
    for in_f, out_f in [(1, 1), (1, 6), (6, 1), (16, 16), (12, 20), (20, 12), (13, 7), (48, 40)]:
        cands = list(cls.hparam_candidates(in_f, out_f))
        assert cands, (name, in_f, out_f)
        keys = {repr(sorted(c.items())) for c in cands}
        assert len(keys) == len(cands)  # no duplicates
        for hp in cands:
            layer = deftly.make(name, in_f, out_f, bias=True, **hp)
            assert layer.hparams() == {**layer.hparams(), **hp}
            n = cls.param_count(in_f, out_f, **hp)
            assert n == sum(p.numel() for nm, p in layer.named_parameters() if nm != "bias")
            assert layer.num_params() == n + out_f


@pytest.mark.parametrize("name", NAMES)
def test_candidates_are_cheap_and_bounded_for_large_layers(name):
    cls = deftly.get(name)
    for in_f, out_f in [(4096, 4096), (4096, 1024), (1024, 4096), (4095, 4097)]:
        t0 = time.perf_counter()
        cands = list(cls.hparam_candidates(in_f, out_f))
        assert time.perf_counter() - t0 < 1.0
        assert 1 <= len(cands) < 2000
        counts = [cls.param_count(in_f, out_f, **hp) for hp in cands]
        assert min(counts) < 0.05 * in_f * out_f  # tight budgets reachable
        assert max(counts) <= in_f * out_f  # nothing costs more than the dense layer


def test_candidate_grids_are_fine():
    band = {(c["lower"], c["upper"]) for c in deftly.get("banded").hparam_candidates(64, 64)}
    assert {(w, w) for w in range(32)} <= band and {(w + 1, w) for w in range(31)} <= band
    tall = {(c["lower"], c["upper"]) for c in deftly.get("banded").hparam_candidates(40, 48)}
    assert (8, 0) in tall and (9, 1) in tall  # bands reaching every row of a tall layer
    blocks = [c["block"] for c in deftly.get("blocktridiag").hparam_candidates(64, 64)]
    assert blocks == list(range(1, 19))  # up to 3 * ceil(64/b) * b^2 <= 64 * 64
    kr = deftly.get("kronecker").hparam_candidates(64, 64)
    assert {c["rank"] for c in kr} >= set(range(1, 33))
    assert len({(c["in_factors"], c["out_factors"]) for c in kr}) >= 4
    bt = {(c["ncores"], c["rank"]) for c in deftly.get("btt").hparam_candidates(4096, 4096)}
    assert bt >= {(2, r) for r in range(1, 33)} | {(3, r) for r in range(1, 16)}
