"""The generic suite: every registered structure gets every test here, driven by the registry.

A new structure only has to register itself, list ``examples()`` and add its refused hyperparameters to
``BAD_EXAMPLES`` in tests/structure_cases.py (checked below): it then gets
dense-equivalence (hypothesis over sizes), the slow-reference check, float64 gradcheck, exact counts,
state_dict round trip, bf16, ``torch.compile(fullgraph=True)``, determinism, init variance and errors.
"""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structure_cases import BAD_EXAMPLES
from torch.utils.flop_counter import FlopCounterMode

import deftly

NAMES = deftly.structures()
SIZES = [1, 2, 3, 5, 7, 8, 13, 16, 24, 31, 64]


def all_cases(in_f: int, out_f: int) -> list[tuple[str, dict]]:
    return [(name, params) for name in NAMES for params in deftly.get(name).examples(in_f, out_f)]


def case_id(case: tuple[str, dict]) -> str:
    name, params = case
    return name + ("-" + "-".join(f"{k}{v}" for k, v in params.items()) if params else "")


CASES_SQ = all_cases(16, 16)
CASES_RECT = all_cases(12, 20) + all_cases(20, 12)


def build(name: str, in_f: int, out_f: int, params: dict, dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    return deftly.make(name, in_f, out_f, bias=bias, dtype=dtype, **params)


def expected(layer, x):
    """x @ to_dense().T + b, computed densely."""
    dense = layer.to_dense()
    x = x.to(dense.dtype)
    y = x @ dense.T
    return y + layer.bias if layer.bias is not None else y


def test_all_issue_structures_registered():
    want = {"dense", "lowrank", "blockdiag", "monarch", "lrbd", "butterfly", "banded", "blocktridiag",
            "kronecker", "btt"}
    assert want <= set(NAMES), f"missing: {want - set(NAMES)}"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(in_f=st.sampled_from(SIZES), out_f=st.sampled_from(SIZES),
       lead=st.lists(st.integers(0, 3), min_size=0, max_size=2), bias=st.booleans(), data=st.data())
def test_forward_equals_dense(name, in_f, out_f, lead, bias, data):
    params = data.draw(st.sampled_from(deftly.get(name).examples(in_f, out_f)))
    layer = build(name, in_f, out_f, params, bias=bias)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, out_f)
    torch.testing.assert_close(y, expected(layer, x), rtol=1e-10, atol=1e-10)
    assert layer.to_dense().shape == (out_f, in_f)


@pytest.mark.parametrize("case", CASES_SQ + CASES_RECT, ids=case_id)
def test_fast_equals_reference(case):
    name, params = case
    for in_f, out_f in [(16, 16), (12, 20), (20, 12)]:
        if params not in deftly.get(name).examples(in_f, out_f):
            continue
        layer = build(name, in_f, out_f, params)
        x = torch.randn(4, in_f, dtype=torch.float64)
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", all_cases(6, 10) + all_cases(10, 6), ids=case_id)
def test_gradcheck_float64(case):
    name, params = case
    for in_f, out_f in [(6, 10), (10, 6)]:
        if params not in deftly.get(name).examples(in_f, out_f):
            continue
        layer = build(name, in_f, out_f, params)
        names = [n for n, _ in layer.named_parameters()]
        x = torch.randn(3, in_f, dtype=layer.to_dense().dtype, requires_grad=True)

        def f(x, *ps, layer=layer, names=names):
            return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

        inputs = (x, *[p.detach().clone().requires_grad_(True) for p in layer.parameters()])
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", CASES_SQ + CASES_RECT, ids=case_id)
def test_counts_exact(case):
    name, params = case
    for in_f, out_f in [(16, 16), (12, 20), (20, 12)]:
        if params not in deftly.get(name).examples(in_f, out_f):
            continue
        for bias in (True, False):
            layer = build(name, in_f, out_f, params, bias=bias, dtype=torch.float32)
            assert layer.num_params() == sum(p.numel() for p in layer.parameters())
            cls = deftly.get(name)
            assert cls.param_count(in_f, out_f, **layer.hparams()) + (out_f if bias else 0) == \
                layer.num_params()
            assert layer.flops(batch=5) == 5 * layer.flops(batch=1) > 0
            if cls.flop_counter_exact:
                x = torch.randn(5, in_f)
                with FlopCounterMode(display=False) as fc:
                    layer(x)
                assert fc.get_total_flops() == layer.flops(batch=5), (fc.get_total_flops(), layer.flops(5))
        assert f"params={layer.num_params()}" in repr(layer)
        for k in layer.hparams():
            assert f"{k}=" in repr(layer)


@pytest.mark.parametrize("case", CASES_SQ + CASES_RECT, ids=case_id)
def test_state_dict_round_trip(case):
    name, params = case
    in_f, out_f = next(size for size in [(20, 12), (16, 16), (12, 20)]
                       if params in deftly.get(name).examples(*size))
    layer = build(name, in_f, out_f, params, seed=1)
    other = deftly.make(name, layer.in_features, layer.out_features, dtype=torch.float64, **layer.hparams())
    other.load_state_dict(layer.state_dict(), strict=True)  # raises on any missing or unexpected key
    x = torch.randn(4, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES_SQ, ids=case_id)
def test_bf16_close_to_fp32(case):
    name, params = case
    layer = build(name, 16, 16, params, dtype=torch.float32)
    if layer.weight_dtype.is_complex:
        pytest.skip("no complex bfloat16 in torch")
    x = torch.randn(32, 16)
    ref = layer(x)
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    scale = ref.abs().max().item() + 1e-6
    # bf16 has 8 mantissa bits: relative error ~ 2^-8 per op, a few ops deep
    assert (y - ref).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph(name):
    params = deftly.get(name).examples(12, 20)[0]
    layer = build(name, 12, 20, params, dtype=torch.float32)
    x = torch.randn(6, 12)
    torch._dynamo.reset()  # every structure shares StructuredLinear.forward: fresh recompile budget
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_monarch():
    """The flagship structure through the real (inductor) compiler, forward and backward."""
    layer = deftly.make("monarch", 12, 20, nblocks=3, out_blocks=4, rank=2)
    x = torch.randn(6, 12, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y, y_ref = compiled(x), layer(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES_SQ, ids=case_id)
def test_deterministic_under_seed(case):
    name, params = case
    a, b = build(name, 16, 16, params, seed=7), build(name, 16, 16, params, seed=7)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb)
    c = build(name, 16, 16, params, seed=8)
    if a.num_params() > 0:
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _output_variance(layer_fn, in_f, out_f, seeds=4, batch=512):
    vals = []
    for s in range(seeds):
        torch.manual_seed(100 + s)
        layer = layer_fn()
        x = torch.randn(batch, in_f, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x) - layer.fixed_residual(x)
            if layer.bias is not None:
                y = y - layer.bias
        vals.append(y.abs().pow(2).mean().item())
    return sum(vals) / len(vals)


@pytest.mark.parametrize("case", all_cases(256, 256) + all_cases(128, 384), ids=case_id)
def test_init_variance_matches_linear(case):
    name, params = case
    for in_f, out_f in [(256, 256), (128, 384)]:
        if params not in deftly.get(name).examples(in_f, out_f):
            continue
        got = _output_variance(functools.partial(deftly.make, name, in_f, out_f, dtype=torch.float64, **params),
                               in_f, out_f)
        want = _output_variance(functools.partial(deftly.make, "dense", in_f, out_f, dtype=torch.float64),
                                in_f, out_f)
        assert abs(got / want - 1) <= 0.2, f"{name} {params} {in_f}x{out_f}: var {got:.4f} vs dense {want:.4f}"


def test_last_dim_mismatch_names_both_sizes():
    for name in NAMES:
        layer = deftly.make(name, 16, 8, **deftly.get(name).examples(16, 8)[0])
        with pytest.raises(ValueError, match=r"last dimension 15.*in_features=16"):
            layer(torch.randn(3, 15))


def _hyperparameters(name: str) -> list[str]:
    sig = inspect.signature(deftly.get(name).__init__)
    return [p.name for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("device", "dtype")]


def test_every_structure_has_bad_examples():
    """A structure registered without an entry in tests/structure_cases.py would silently skip the bad-input
    test below; one with hyperparameters needs at least one refused set, and stale entries are errors too."""
    names = deftly.structures()
    missing = [n for n in names if n not in BAD_EXAMPLES]
    assert not missing, f"add BAD_EXAMPLES entries in tests/structure_cases.py for {missing}"
    stale = sorted(set(BAD_EXAMPLES) - set(names))
    assert not stale, f"BAD_EXAMPLES lists unregistered structures {stale}"
    empty = [n for n in names if _hyperparameters(n) and not BAD_EXAMPLES[n]]
    assert not empty, f"structures with hyperparameters but no bad examples: {empty}"
    for name in names:
        unknown = {k for bad in BAD_EXAMPLES[name] for k in bad} - set(_hyperparameters(name))
        assert not unknown, f"{name}: BAD_EXAMPLES uses parameters it does not take: {sorted(unknown)}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_hyperparameters_raise(name):
    assert name in BAD_EXAMPLES, f"add a BAD_EXAMPLES entry for {name!r} in tests/structure_cases.py"
    for bad in BAD_EXAMPLES[name]:
        with pytest.raises((ValueError, TypeError)) as info:
            deftly.make(name, 16, 16, **bad)
        msg = str(info.value)
        assert any(k in msg for k in bad), f"{name}{bad}: message does not name the parameter: {msg}"
    with pytest.raises(ValueError, match="no parameter 'definitely_not_a_param'"):
        deftly.make(name, 16, 16, definitely_not_a_param=3)
    with pytest.raises(ValueError, match="in_features=0"):
        deftly.make(name, 0, 16)


def test_unknown_structure_lists_choices():
    with pytest.raises(ValueError, match=r"unknown structure 'monarc'.*choose one of: .*blockdiag.*monarch"):
        deftly.make("monarc", 8, 8)


def test_wrong_input_dtype_is_a_clear_error():
    layer = deftly.make("dense", 4, 4)
    with pytest.raises(TypeError, match="not floating point"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="does not match"):
        layer(torch.ones(2, 4, dtype=torch.float64))


def test_flops_ratio_sane():
    """Structured FLOPs are below dense for the compressed examples at a real size."""
    for name in NAMES:
        if name == "dense":
            continue
        layer = deftly.make(name, 1024, 1024, **deftly.get(name).examples(1024, 1024)[0])
        assert layer.flops() < 2 * 1024 * 1024, name
        assert math.isfinite(layer.compression())
