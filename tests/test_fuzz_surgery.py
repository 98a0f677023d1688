"""Model surgery under bad input (issue 11): ``StructureConfig`` x model shapes x budgets, over-large ranks,
fixed hyperparameters over the budget, non-finite or empty calibration data.

``test_structurize_any_config`` (hypothesis): every outcome is either a correct model within budget (each
structured layer's weights at most ``budget`` x the dense weight, its ``forward`` equal to
``x @ to_dense().T + b``, the model's outputs finite) or a ``ValueError`` / ``TypeError`` that leaves the
model unchanged (state dict and module types equal before and after). The helpers (settings, hang guard,
hyperparameter values) are tests/test_fuzz.py's.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_cases import BAD_EXAMPLES
from test_fuzz import FUZZ, NAMES, hparam_names, no_hang, values_for

import deftly

COUNTS: Counter = Counter()


# --------------------------------------------------------------------------- over-large hyperparameters
def _max_rank(name: str, in_f: int, out_f: int, hp: dict) -> int:
    """The largest rank that adds expressiveness, from the definitions (independent of the layer code):
    low-rank: min(in, out); Monarch: the (out block x in block) slice, min(ceil(out/l), ceil(in/k));
    Kronecker: the rank of the Van Loan-Pitsianis rearrangement, min(o1 i1, o2 i2); BTT: the largest
    bond, max_k min(prod(in_factors[d-k:]), prod(out_factors[k:]))."""
    if name in ("lowrank", "lrbd"):
        return min(in_f, out_f)
    if name == "monarch":
        return min(-(-in_f // hp["nblocks"]), -(-out_f // hp["out_blocks"]))
    if name == "kronecker":
        (i1, i2), (o1, o2) = hp["in_factors"], hp["out_factors"]
        return min(o1 * i1, o2 * i2)
    nf, mf = hp["in_factors"], hp["out_factors"]
    d = len(nf)
    return max(min(math.prod(nf[d - k:]), math.prod(mf[k:])) for k in range(1, d))


RANK_CASES = [("lowrank", 16, 8, {}), ("lowrank", 5, 12, {}), ("lrbd", 12, 6, {"nblocks": 2}),
              ("monarch", 16, 16, {"nblocks": 4, "out_blocks": 4}), ("monarch", 13, 22, {"nblocks": 3, "out_blocks": 5}),
              ("kronecker", 12, 20, {"in_factors": (3, 4), "out_factors": (4, 5)}),
              ("kronecker", 8, 16, {"in_factors": (2, 4), "out_factors": (4, 4)}),
              ("btt", 16, 16, {"ncores": 2, "in_factors": (4, 4), "out_factors": (4, 4)}),
              ("btt", 12, 8, {"ncores": 3, "in_factors": (3, 2, 2), "out_factors": (2, 2, 2)}),
              ("btt", 27, 8, {"ncores": 3, "in_factors": (3, 3, 3), "out_factors": (2, 2, 2)})]


@pytest.mark.parametrize("case", RANK_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_rank_above_saturation_is_refused_and_the_maximum_is_exact(case):
    """Every structure with a rank refuses a rank above the one that saturates it (more parameters, no more
    expressiveness: was `make("lowrank", 16, 8, rank=100)` accepted, "0.06x fewer than dense"), naming rank
    and the bound; at the bound the projection of a random dense matrix is exact (so the refusal loses
    nothing), one below it is not."""
    name, in_f, out_f, hp = case
    top = _max_rank(name, in_f, out_f, hp)
    for bad in (top + 1, 100):
        with pytest.raises(ValueError, match=rf"rank={bad} is invalid; it must be <= {top}\b"):
            deftly.make(name, in_f, out_f, rank=bad, **hp)
    if name == "lrbd":
        return  # lr + block-diagonal: its projection is not the question here (its low-rank part is)
    W = torch.randn(out_f, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for rank, exact in ((top, True), (top - 1, False)):
        if rank < 1:
            continue
        _, err = deftly.project(W, name, rank=rank, **hp)
        assert (err < 1e-9) == exact, (name, rank, top, err)


def test_bad_examples_include_an_over_large_rank():
    """The generic bad-input test (tests/test_generic.py) runs BAD_EXAMPLES (tests/structure_cases.py) at 16x16:
    every structure with a rank lists one above its 16x16 bound."""
    for name in NAMES:
        if "rank" in hparam_names(name):
            ranks = [b["rank"] for b in BAD_EXAMPLES[name] if isinstance(b.get("rank"), int)]
            assert any(r > 1 for r in ranks), (name, ranks)


# --------------------------------------------------------------------------- budgets with fixed hparams
def _mlp(widths=(24, 24, 24, 10), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.GELU()] if i < len(widths) - 2 else [])
    return torch.nn.Sequential(*layers)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _unchanged(model, snap) -> bool:
    sd, types = snap
    now = model.state_dict()
    return (set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())
            and [(n, type(m)) for n, m in model.named_modules()] == types)


def test_fixed_hparams_over_budget_are_an_error_naming_layer_params_and_budget():
    """Was: hparams={"rank": 40} with budget=0.1 built 1.25x the dense parameters under a report that said
    budget 0.1. Now an error names the layer, the count, the budget and the way out (budget=None)."""
    m = _mlp((64, 64, 64, 10))
    snap = _snapshot(m)
    cfg = deftly.StructureConfig(structure="lowrank", budget=0.1, hparams={"rank": 40}, steps=0)
    with pytest.raises(ValueError) as info:
        deftly.structurize(m, cfg)
    msg = str(info.value)
    # rank 40 on 64 x 64: 40 * (64 + 64) = 5,120 weights of dense 64 * 64 = 4,096 (with the biases: 5,184 of
    # 4,160); either way 1.25x dense
    for want in ("layer '0'", "{'rank': 40}", "budget=0.1", "budget=None"):
        assert want in msg, (want, msg)
    assert re.search(r"give (5,120|5,184) params = 1\.25 of dense \((4,096|4,160)\)", msg), msg
    assert _unchanged(m, snap)
    # the documented way to build explicit values whatever their size: budget=None for that layer
    cfg = deftly.StructureConfig(structure="lowrank", budget=0.1, hparams={"rank": 40}, steps=0,
                                 overrides={"0": {"budget": None}, "2": {"budget": None}})
    report = deftly.structurize(m, cfg)
    assert report["0"].hparams == {"rank": 40} and m[0].num_params() == 5184


def test_invalid_fixed_hparam_with_a_budget_names_the_hparam_not_the_budget():
    """Was: nblocks > in_features with a budget set said "Raise the budget"."""
    for structure, hp, want in (("monarch", {"nblocks": 100}, "nblocks=100 is invalid"),
                                ("blockdiag", {"nblocks": 100}, "nblocks=100 is invalid"),
                                ("lowrank", {"rank": 0}, "rank=0 is invalid")):
        m = _mlp((64, 64, 64, 10))
        snap = _snapshot(m)
        with pytest.raises(ValueError) as info:
            deftly.structurize(m, deftly.StructureConfig(structure=structure, budget=0.25, hparams=hp, steps=0))
        msg = str(info.value)
        assert "layer '0'" in msg and want in msg and "Raise the budget" not in msg, msg
        assert _unchanged(m, snap)
    # a real budget problem still says so, with the fixed value
    with pytest.raises(ValueError, match=r"no monarch hyperparameters fit budget=0\.001.*with \{'nblocks': 8\} "
                                         r"fixed.*Raise the budget"):
        deftly.structurize(_mlp((64, 64, 64, 10)), deftly.StructureConfig(structure="monarch", budget=0.001,
                                                                          hparams={"nblocks": 8}, steps=0))


# --------------------------------------------------------------------------- calibration data
def test_non_finite_calibration_names_the_layer_and_counts_the_values():
    """Was: `linalg.eigh failed to converge`, naming neither NaN nor the layer."""
    m = _mlp()
    snap = _snapshot(m)
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    x[3, 5] = float("nan")
    x[7, 1] = float("inf")
    x[9, 2] = float("nan")
    cfg = deftly.StructureConfig(structure="lowrank", budget=0.25, calibration=x, steps=0)
    with pytest.raises(ValueError, match=r"calibration inputs of layer '0' contain 3 non-finite value\(s\) "
                                         r"\(2 NaN, 1 inf\) among 768"):
        deftly.structurize(m, cfg)
    assert _unchanged(m, snap)
    # finite inputs that become NaN inside the model: the first layer that sees them is named
    m2 = _mlp()
    with torch.no_grad():
        m2[0].bias[4] = float("inf")
        m2[0].weight[4].zero_()
    with pytest.raises(ValueError, match=r"layer '2' contain 32 non-finite"):
        deftly.structurize(m2, deftly.StructureConfig(structure="lowrank", budget=0.25, steps=0,
                                                      calibration=torch.randn(32, 24), exclude_modules=["0"]))


def test_empty_calibration_says_it_was_empty():
    """Was: 0 rows of calibration data said "calibration never reached 2 targeted layers"."""
    m = _mlp()
    snap = _snapshot(m)
    for cal in (torch.zeros(0, 24), [torch.zeros(0, 24), torch.zeros(0, 24)]):
        with pytest.raises(ValueError, match=r"calibration data is empty: 2 targeted layer\(s\) .*0 rows"):
            deftly.structurize(m, deftly.StructureConfig(structure="lowrank", budget=0.25, calibration=cal, steps=0))
        assert _unchanged(m, snap)
    with pytest.raises(ValueError, match="never reached"):  # a callable that runs nothing
        deftly.structurize(m, deftly.StructureConfig(structure="lowrank", budget=0.25, calibration=lambda mod: None,
                                                     steps=0))
    from deftly.core.projection import Calibration

    with pytest.raises(ValueError, match=r"empty \(no samples\): 1 batch"):
        _ = Calibration(torch.zeros(0, 5)).cov


def test_calibration_the_model_cannot_run_is_a_value_error_and_changes_nothing():
    """Found by the fuzz below: inputs too wide for an untargeted first layer raised torch's raw
    "mat1 and mat2 shapes cannot be multiplied" from inside the user's model."""
    m = _mlp((1, 1, 2))
    snap = _snapshot(m)
    cfg = deftly.StructureConfig(structure="banded", target_modules=["2"], calibration=torch.randn(6, 2), steps=0)
    with pytest.raises(ValueError, match=r"running the calibration data through the model failed \(mat1 and mat2 "
                                         r"shapes cannot be multiplied.*pass inputs the model accepts"):
        deftly.structurize(m, cfg)
    assert _unchanged(m, snap)


def test_complex_structure_in_a_real_model_is_refused():
    """Found by the fuzz below: butterfly with complex=True replaced a real layer and the model's next
    GELU failed on complex activations."""
    m = _mlp((1, 1, 2))
    snap = _snapshot(m)
    for init in ("project", "random"):
        cfg = deftly.StructureConfig(structure="butterfly", hparams={"complex": True}, init=init, steps=0)
        with pytest.raises(ValueError, match=r"layer '0' \(1 x 1\): hparams .*complex.* in place of a real "
                                             r"torch.float32 one.*drop complex=True"):
            deftly.structurize(m, cfg)
        assert _unchanged(m, snap)


# --------------------------------------------------------------------------- StructureConfig x shapes x budgets
BUDGETS = [None, None, 0.02, 0.1, 0.25, 0.5, 0.5, 1.0, 1.0]
BAD_BUDGETS = [0, -0.5, 1.5, float("nan"), "0.5", True]


FAULTS = ["misspelt", "bad-budget", "bad-kind", "bad-target", "junk-hparams", "nan-cal", "wide-cal", "empty-cal"]


@st.composite
def surgery_cases(draw):
    """(widths, StructureConfig kwargs, bias): a valid request (half of them) or one with exactly one fault."""
    fault = draw(st.sampled_from([None] * len(FAULTS) + FAULTS))
    widths = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 12, 16, 20, 31]), min_size=2, max_size=4)))
    widths = (*widths, draw(st.sampled_from([2, 10])))  # the last Linear is the output head
    structure = draw(st.sampled_from(NAMES))
    if fault == "misspelt":
        structure += draw(st.sampled_from(["x", "_", "s"]))
    kw: dict = {"structure": structure, "steps": 0,
                "budget": draw(st.sampled_from(BAD_BUDGETS if fault == "bad-budget" else BUDGETS)),
                "budget_kind": "watts" if fault == "bad-kind" else draw(st.sampled_from(["params"] * 3 + ["flops"])),
                "init": draw(st.sampled_from(["project", "project", "random"])),
                "select": draw(st.sampled_from(["params", "params", "error"]))}
    if fault == "junk-hparams" and hparam_names(structure):
        kw["hparams"] = {draw(st.sampled_from(hparam_names(structure))): draw(values_for(structure))}
    elif fault != "misspelt" and draw(st.sampled_from([False] * 3 + [True])):  # an example's values, fixed
        a, b = draw(st.sampled_from(list(itertools.pairwise(widths))))
        kw["hparams"] = dict(draw(st.sampled_from(deftly.get(structure).examples(a, b))))
    n_layers = len(widths) - 1
    names = [str(2 * i) for i in range(n_layers)]  # nn.Sequential: Linear, GELU, Linear, ...
    target = "bad-list" if fault == "bad-target" else draw(st.sampled_from(["all-linear", "list", "regex"]))
    if target == "list":
        kw["target_modules"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n_layers, unique=True))
    elif target == "regex":
        kw["target_modules"] = r"\d+"
    elif target == "bad-list":
        kw["target_modules"] = [draw(st.sampled_from(names)) + "x"]
    if draw(st.sampled_from([False] * 3 + [True])):
        ov = {"budget": draw(st.sampled_from(BUDGETS))}
        if draw(st.booleans()):
            ov["structure"] = draw(st.sampled_from(NAMES))
        kw["overrides"] = {draw(st.sampled_from(names)): ov}
    if fault in ("nan-cal", "wide-cal", "empty-cal") or draw(st.sampled_from([False] * 3 + [True])):
        x = torch.randn(0 if fault == "empty-cal" else 6, widths[0] + (fault == "wide-cal"),
                        generator=torch.Generator().manual_seed(1))
        if fault == "nan-cal":
            x[0, 0] = float("nan")
        kw["calibration"] = x
    return widths, kw, draw(st.booleans())


def _layer_budget(kw: dict, name: str):
    ov = kw.get("overrides", {}).get(name, {})
    return ov["budget"] if "budget" in ov else kw.get("budget")


@settings(FUZZ, max_examples=150)
@given(case=surgery_cases())
def _fuzz_structurize(case):
    widths, kw, bias = case
    torch.manual_seed(0)
    model = _mlp(widths)
    if not bias:
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.bias = None
    snap = _snapshot(model)
    try:
        with no_hang():
            cfg = deftly.StructureConfig(**kw)
            report = deftly.structurize(model, cfg)
    except (ValueError, TypeError) as err:
        msg = str(err)
        assert len(msg) > 20 and "Traceback" not in msg, msg
        assert _unchanged(model, snap), f"{kw}: the error {msg!r} left the model changed"
        COUNTS["structurize: refused"] += 1
        return
    assert not _unchanged(model, snap), "structurize returned but replaced nothing"
    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (5, widths[-1]) and bool(torch.isfinite(y).all()), (kw, y)
    structured = [(n, m) for n, m in model.named_children() if isinstance(m, deftly.StructuredLinear)]
    assert structured and sorted(n for n, _ in structured) == sorted(r.name for r in report.layers)
    kind = kw["budget_kind"]
    for name, layer in structured:
        in_f, out_f = layer.in_features, layer.out_features
        has_bias = layer.bias is not None
        # the structured weights (biases stay dense) within budget x the dense weight: implied by the budget
        # whether or not it counts the bias on both sides
        weights = sum(p.numel() for p in layer.parameters()) - (out_f if has_bias else 0)
        budget = _layer_budget(kw, name)
        if budget is not None:
            if kind == "params":
                assert weights <= budget * in_f * out_f + 1e-9, (name, weights, budget, in_f * out_f, kw)
            else:
                assert layer.flops(1) <= budget * 2 * in_f * out_f + 1e-9, (name, layer.flops(1), budget, kw)
        with torch.no_grad():
            xi = torch.randn(4, in_f, generator=torch.Generator().manual_seed(3))
            dense = layer.to_dense().to(torch.float64)
            ref = xi.to(torch.float64) @ dense.T + (layer.bias.to(torch.float64) if has_bias else 0)
            got = layer(xi).to(torch.float64)
        scale = float((xi.abs().to(torch.float64) @ dense.abs().T).max()) + 1e-6
        assert float((got - ref).abs().max()) <= 2e-4 * scale, (name, kw)
    COUNTS["structurize: built and checked"] += 1


def test_structurize_any_config():
    COUNTS.clear()
    _fuzz_structurize()
    print("\nstructurize fuzz:", dict(COUNTS))
    assert COUNTS["structurize: built and checked"] >= 25 and COUNTS["structurize: refused"] >= 25, COUNTS

