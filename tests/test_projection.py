"""Projection of dense weights onto structures: closed forms, the generic fit, activation-aware
projection, and the budget search (``hparam_candidates`` / ``choose_hparams``)."""

from __future__ import annotations

import math

import pytest
import torch

import deftly
from deftly.core.linalg import low_rank_factors
from deftly.core.projection import Calibration, project_layer_, relative_error
from deftly.surgery.budget import choose_hparams, dense_count

CLOSED = ["dense", "lowrank", "blockdiag", "monarch", "lrbd"]

# (structure, in, out, hparams): square, tall, wide, padded (non-dividing) and rank-r cases
STRUCTURED_CASES = [
    ("dense", 12, 20, {}),
    ("lowrank", 30, 20, {"rank": 4}),
    ("lowrank", 8, 8, {"rank": 8}),  # full rank min(in, out) (higher ranks are refused)
    ("blockdiag", 13, 22, {"nblocks": 3}),
    ("blockdiag", 24, 24, {"nblocks": 4}),
    ("monarch", 16, 16, {"nblocks": 4, "out_blocks": 4, "rank": 1}),
    ("monarch", 24, 36, {"nblocks": 4, "out_blocks": 3, "rank": 2}),
    ("monarch", 13, 22, {"nblocks": 3, "out_blocks": 5, "rank": 2}),
    ("monarch", 40, 10, {"nblocks": 5, "out_blocks": 2, "rank": 3}),
    ("lrbd", 20, 30, {"rank": 3, "nblocks": 4}),
    ("lrbd", 24, 24, {"rank": 2, "nblocks": 3}),
]


def _case_id(c):
    return f"{c[0]}-{c[1]}x{c[2]}-" + "-".join(f"{k}{v}" for k, v in c[3].items())


def _structured(name, in_f, out_f, hp, seed=0):
    torch.manual_seed(seed)
    return deftly.make(name, in_f, out_f, dtype=torch.float32, **hp).to_dense().detach()


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(0)
    return torch.randn(n, d, generator=g) @ mix + 0.1 * torch.randn(1, d, generator=g)


@pytest.mark.parametrize("case", STRUCTURED_CASES, ids=_case_id)
def test_projecting_a_structured_matrix_recovers_it(case):
    name, in_f, out_f, hp = case
    W = _structured(name, in_f, out_f, hp)
    layer, err = deftly.project(W, name, **hp)
    assert err < 2e-6, err
    assert layer.to_dense().dtype == torch.float32
    torch.testing.assert_close(layer.to_dense(), W, rtol=0, atol=2e-6 * W.abs().max().item())


@pytest.mark.parametrize("rank", [1, 3, 7, 12])
def test_lowrank_error_is_eckart_young(rank):
    torch.manual_seed(1)
    W = torch.randn(12, 18, dtype=torch.float64)
    s = torch.linalg.svdvals(W)
    want = math.sqrt(float(s[rank:].pow(2).sum() / s.pow(2).sum()))
    layer, err = deftly.project(W, "lowrank", rank=rank)
    assert err == pytest.approx(want, abs=1e-12)
    assert relative_error(W, layer.to_dense()) == pytest.approx(want, abs=1e-12)


def test_block_extraction_is_the_blockdiag_projection():
    torch.manual_seed(2)
    W = torch.randn(22, 13)
    layer, err = deftly.project(W, "blockdiag", nblocks=3)
    S = layer.to_dense()
    mask = deftly.make("blockdiag", 13, 22, nblocks=3).to_dense() != 0
    torch.testing.assert_close(S, W * mask, rtol=0, atol=0)
    assert err == pytest.approx(float((W * ~mask).norm() / W.norm()), rel=1e-6)


@pytest.mark.parametrize("name,hp", [("lowrank", {"rank": 3}), ("blockdiag", {"nblocks": 4}),
                                     ("monarch", {"nblocks": 4, "rank": 1}),
                                     ("monarch", {"nblocks": 3, "out_blocks": 6, "rank": 2}),
                                     ("lrbd", {"rank": 2, "nblocks": 4})])
def test_never_worse_than_trivial_baselines(name, hp):
    torch.manual_seed(3)
    W = torch.randn(36, 24, dtype=torch.float64)
    layer, err = deftly.project(W, name, **hp)
    if not layer.has_fixed_residual:
        assert err <= 1.0  # the zero matrix
    if name == "lrbd":
        # I + block extraction of W - I, and I + truncated SVD of W - I (the two single projections)
        bd = deftly.make("blockdiag", 24, 36, nblocks=hp["nblocks"], dtype=torch.float64)
        eye = torch.eye(36, 24, dtype=torch.float64)
        bd_err = relative_error(W, eye + bd.dense_from_blocks(bd.projected_blocks(W - eye)))
        U, V = low_rank_factors(W - eye, hp["rank"])
        lr_err = relative_error(W, eye + U @ V)
        assert err <= min(bd_err, lr_err) + 1e-12, (err, bd_err, lr_err)
    if name == "monarch":  # block extraction is one Monarch when blocks line up; Monarch keeps rank-r slices
        assert err < 1.0


def test_monarch_projection_is_slicewise_svd():
    """Each (output block, input block) slice of the projection is that slice's truncated SVD."""
    torch.manual_seed(4)
    W = torch.randn(12, 8, dtype=torch.float64)
    layer, _ = deftly.project(W, "monarch", nblocks=2, out_blocks=3, rank=1)
    S = layer.to_dense()
    for j in range(3):  # output block j holds rows s' * 3 + j
        rows = torch.arange(j, 12, 3)
        for i in range(2):
            cols = torch.arange(4 * i, 4 * i + 4)
            Wji = W[rows][:, cols]
            U, sv, Vh = torch.linalg.svd(Wji)
            torch.testing.assert_close(S[rows][:, cols], sv[0] * torch.outer(U[:, 0], Vh[0]))


def test_every_registered_structure_projects():
    """Closed form or the generic L-BFGS fallback: finite, deterministic, and not worse than zero."""
    torch.manual_seed(5)
    W = torch.randn(20, 12)
    for name in deftly.structures():
        hp = deftly.get(name).examples(12, 20)[0]
        layer, err = deftly.project(W, name, **hp)
        again, err2 = deftly.project(W, name, **hp)
        assert math.isfinite(err), name
        assert err == err2, f"{name}: projection is not deterministic ({err} vs {err2})"
        assert torch.equal(layer.to_dense(), again.to_dense()), name
        if not layer.has_fixed_residual:
            assert err <= 1.0 + 1e-6, f"{name}: error {err} is worse than the zero matrix"


def test_fit_fallback_matches_closed_forms():
    torch.manual_seed(6)
    W = torch.randn(16, 24, dtype=torch.float64)
    for name, hp in [("lowrank", {"rank": 4}), ("monarch", {"nblocks": 4, "out_blocks": 4, "rank": 1})]:
        _, closed = deftly.project(W, name, **hp)
        _, fitted = deftly.project(W, name, method="fit", **hp)
        assert fitted == pytest.approx(closed, rel=1e-4), name
    # and it recovers an exactly structured matrix without any closed form
    Wm = _structured("monarch", 16, 16, {"nblocks": 4, "rank": 1})
    _, err = deftly.project(Wm, "monarch", method="fit", nblocks=4, rank=1)
    assert err < 1e-5


def test_project_method_on_the_base_class_and_bias():
    torch.manual_seed(7)
    W, b = torch.randn(10, 6), torch.randn(10)
    layer = deftly.make("lowrank", 6, 10, rank=6)
    err = layer.project_(W, b)
    assert err < 1e-6
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ W.T + b, rtol=1e-5, atol=1e-5)
    layer.project_(W)  # no bias given: the bias is zeroed
    assert torch.equal(layer.bias, torch.zeros(10))
    plain, _ = deftly.project(W, "lowrank", rank=2)
    assert plain.bias is None
    with_bias, _ = deftly.project(W, "lowrank", b, rank=2)
    assert torch.equal(with_bias.bias, b)


def test_project_errors_name_the_problem():
    layer = deftly.make("lowrank", 6, 10, rank=2)
    with pytest.raises(ValueError, match=r"shape \(6, 10\).*\(10, 6\).*transposed.*weight\.T"):
        layer.project_(torch.randn(6, 10))
    with pytest.raises(ValueError, match="non-finite"):
        layer.project_(torch.full((10, 6), float("nan")))
    with pytest.raises(ValueError, match="bias must be a tensor of shape \\(10,\\)"):
        layer.project_(torch.randn(10, 6), torch.randn(3))
    nobias = deftly.make("lowrank", 6, 10, bias=False, rank=2)
    with pytest.raises(ValueError, match="layer has none"):
        nobias.project_(torch.randn(10, 6), torch.randn(10))
    with pytest.raises(ValueError, match="method='nope' is invalid"):
        layer.project_(torch.randn(10, 6), method="nope")
    with pytest.raises(ValueError, match="last dimension 5 but the layer has in_features=6"):
        layer.project_(torch.randn(10, 6), calibration=torch.randn(4, 5))
    with pytest.raises(ValueError, match="unknown structure 'monarc'"):
        deftly.project(torch.randn(4, 4), "monarc")
    with pytest.raises(ValueError, match="2-D"):
        deftly.project(torch.randn(4), "lowrank")


# ---------------------------------------------------------------------------------------------- activation-aware
def test_whitened_lowrank_is_the_exact_optimum():
    """With full-rank X the optimum is [W C^1/2]_r C^-1/2; deftly's inverse-free form reaches it."""
    torch.manual_seed(8)
    W = torch.randn(10, 8, dtype=torch.float64)
    X = _correlated_inputs(200, 8).double()
    C = X.T @ X / len(X)
    lam, Q = torch.linalg.eigh(C)
    half, ihalf = Q @ torch.diag(lam.sqrt()) @ Q.T, Q @ torch.diag(lam.rsqrt()) @ Q.T
    U, s, Vh = torch.linalg.svd(W @ half)
    best = (U[:, :3] * s[:3]) @ Vh[:3] @ ihalf
    want = float(((W - best) @ X.T).norm() / (W @ X.T).norm())
    _, err = deftly.project(W, "lowrank", calibration=X, rank=3)
    assert err == pytest.approx(want, rel=1e-9)


def test_whitened_blockdiag_is_per_row_least_squares():
    torch.manual_seed(9)
    W = torch.randn(9, 12, dtype=torch.float64)
    X = _correlated_inputs(100, 12).double()
    layer, err = deftly.project(W, "blockdiag", calibration=X, nblocks=3)
    S = layer.to_dense().detach()
    for o in range(9):
        J = torch.arange(4 * (o // 3), 4 * (o // 3) + 4)
        sol = torch.linalg.lstsq(X[:, J], (X @ W[o]).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(S[o, J], sol)
    assert err == pytest.approx(float(((W - S) @ X.T).norm() / (W @ X.T).norm()), rel=1e-9)


@pytest.mark.parametrize("name,hp", [("lowrank", {"rank": 3}), ("blockdiag", {"nblocks": 3}),
                                     ("monarch", {"nblocks": 4, "out_blocks": 3, "rank": 1}),
                                     ("lrbd", {"rank": 2, "nblocks": 3}), ("dense", {})])
def test_activation_aware_lowers_the_output_error(name, hp):
    torch.manual_seed(10)
    W = torch.randn(18, 24, dtype=torch.float64)
    X = _correlated_inputs(300, 24).double()
    plain, _ = deftly.project(W, name, **hp)
    plain_out = relative_error(W, plain.to_dense(), X.T @ X / len(X))
    layer = deftly.make(name, 24, 18, dtype=torch.float64, **hp)
    res = project_layer_(layer, W, calibration=X)
    assert res.plain_output_error == pytest.approx(plain_out, rel=1e-9)
    assert res.output_error == pytest.approx(float(((W - layer.to_dense()) @ X.T).norm() / (W @ X.T).norm()),
                                             rel=1e-9)
    assert res.error == res.output_error
    assert res.output_error <= plain_out + 1e-12
    if name != "dense":
        assert res.output_error < 0.9 * plain_out, (res.output_error, plain_out)
    # the calibration object form gives the same answer
    again = deftly.make(name, 24, 18, dtype=torch.float64, **hp)
    assert again.project_(W, calibration=Calibration(X)) == pytest.approx(res.output_error, rel=1e-9)


def test_calibration_accumulates_batches():
    X = _correlated_inputs(64, 5)
    a = Calibration(X)
    b = Calibration(in_features=5)
    b.add(X[:20])
    b.add(X[20:].reshape(2, 22, 5))
    torch.testing.assert_close(a.cov, b.cov)
    assert b.count == 64
    with pytest.raises(ValueError, match="no samples"):
        _ = Calibration(in_features=5).cov


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("name", ["lowrank", "blockdiag", "monarch", "lrbd", "dense"])
def test_candidates_are_valid_and_counted_exactly(name):
    cls = deftly.get(name)
    for in_f, out_f in [(12, 20), (20, 12), (16, 16)]:
        cands = list(cls.hparam_candidates(in_f, out_f))
        assert cands
        for hp in cands[:: max(1, len(cands) // 25)]:
            layer = deftly.make(name, in_f, out_f, bias=False, **hp)
            assert layer.num_params() == cls.param_count(in_f, out_f, **hp)
    assert [c["rank"] for c in deftly.get("lowrank").hparam_candidates(12, 20)] == list(range(1, 13))
    assert [c["nblocks"] for c in deftly.get("blockdiag").hparam_candidates(12, 20)] == list(range(1, 13))


@pytest.mark.parametrize("name", sorted(deftly.structures()))
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_choose_hparams_fills_the_budget_in_the_preferred_shape(name, kind):
    """Never over the budget (on the weight for ``params``: biases stay dense); at least FILL of the fullest
    admissible count; and no admissible candidate that fills FILL of it has a better shape score."""
    from deftly.surgery.budget import FILL

    cls = deftly.get(name)
    in_f, out_f = 24, 40
    cands = []
    for hp in cls.hparam_candidates(in_f, out_f):
        try:
            n = (cls.param_count(in_f, out_f, **hp) if kind == "params" else cls.flop_count(in_f, out_f, **hp))
        except (TypeError, ValueError):
            continue
        cands.append((n, hp))
    for budget in (0.1, 0.25, 0.5, 1.0):
        limit = budget * (in_f * out_f if kind == "params" else dense_count(in_f, out_f, kind))
        fits = [(n, hp) for n, hp in cands if n <= limit]
        if not fits:
            with pytest.raises(ValueError, match=f"no {name} hyperparameters fit budget={budget}"):
                choose_hparams(name, in_f, out_f, budget, kind=kind)
            continue
        hp = choose_hparams(name, in_f, out_f, budget, kind=kind)[0]
        layer = deftly.make(name, in_f, out_f, bias=False, **hp)
        got = layer.num_params() if kind == "params" else layer.flops()
        fullest = max(n for n, _ in fits)
        assert FILL * fullest <= got <= limit
        score = cls.shape_score(in_f, out_f, **hp)
        assert all(cls.shape_score(in_f, out_f, **h) >= score - 1e-9 for n, h in fits if n >= FILL * fullest)


def test_budget_error_says_what_fits():
    with pytest.raises(ValueError, match=r"no monarch hyperparameters fit budget=0\.001.*smallest candidate"
                                         r".*Raise the budget"):
        choose_hparams("monarch", 64, 64, 0.001)
    hp = choose_hparams("monarch", 64, 64, 0.5, fixed={"nblocks": 1})[0]  # fixed values outside the grid
    assert hp["nblocks"] == 1
