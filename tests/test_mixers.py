"""deftly.mixers: long convolutions exact against the O(T^2) definition, exactly causal by gradients, and
the generic module checks over every mixer (fp64 gradcheck, bf16, torch.compile, state_dict round trip,
meta-device init, errors naming sizes and fixes, DDP on 2 processes equal to one process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deftly
import deftly.mixers as M

# the 2-process launcher of tests/test_distributed.py (rendezvous store bound to port 0, one retry, logs)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distributed as td

PATHS = M.FFT_PATHS
D, MAX_LEN = 8, 16
SMALL_FILTER = {"bands": 2, "hidden": 4}

# every mixer configuration the generic checks run on: (id, builder kwargs)
CASES = {
    "mm-causal-implicit-torch": ("monarch-mixer", {"filter_kwargs": SMALL_FILTER}),
    "mm-causal-explicit-monarch-lowrank": ("monarch-mixer", {"fft": "monarch", "filter": "explicit",
                                                              "structure": "lowrank",
                                                              "structure_kwargs": {"rank": 2}}),
    "mm-bidirectional-implicit-butterfly-dense": ("monarch-mixer", {"causal": False, "fft": "butterfly",
                                                                    "structure": "dense",
                                                                    "filter_kwargs": SMALL_FILTER}),
    "attention-causal": ("attention", {"heads": 2}),
    "block-monarch-mixer": ("block", {"mixer_kwargs": {"filter_kwargs": SMALL_FILTER}}),
}


def build(case: str, seed: int = 0, **factory) -> nn.Module:
    kind, kw = CASES[case]
    kw = dict(kw)
    causal = kw.pop("causal", True)
    torch.manual_seed(seed)
    if kind == "block":
        return M.MixerBlock(D, MAX_LEN, causal, **kw, **factory)
    return M.make_mixer(kind, D, MAX_LEN, causal, **kw, **factory)


def is_causal(case: str) -> bool:
    return CASES[case][1].get("causal", True)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------- FFT pieces
def test_fft_length_is_a_smooth_length_at_least_2T_minus_1():
    for T in [1, 2, 3, 5, 64, 97, 1000, 4096, 10007]:
        for path in PATHS:
            n = M.fft_length(T, path)
            assert n >= 2 * T - 1
            m = n
            for p in (2, 3, 5):
                while m % p == 0:
                    m //= p
            assert m == 1
        assert M.fft_length(T, "butterfly") & (M.fft_length(T, "butterfly") - 1) == 0
    assert M.fft_length(1000) == 2000 and M.fft_length(64) == 128 and M.fft_length(97) == 200


@pytest.mark.parametrize("n", [1, 2, 6, 12, 64, 100, 360, 2048, 3125])
def test_monarch_fft_is_the_dft_in_digit_reversed_order(n):
    sizes = M.monarch_factors(n)
    assert int(torch.tensor(sizes).prod()) == n and (n <= 32 or max(sizes) <= 32)
    sigma = M.monarch_frequencies(sizes)
    assert sorted(sigma.tolist()) == list(range(n))  # a permutation, never applied to data
    x = torch.randn(3, n, dtype=torch.float64)
    X = M.monarch_fft(x, sizes)
    assert rel_err(X, torch.fft.fft(x)[:, sigma]) < 1e-13
    assert rel_err(M.monarch_ifft(X, sizes), x) < 1e-13


# ----------------------------------------------------------------------------- exactness vs O(T^2)
EXACT_T = list(range(1, 65)) + [97, 300, 1000]


@pytest.mark.parametrize("fft", PATHS)
def test_causal_conv_equals_direct_convolution_float64(fft):
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for T in EXACT_T:
        x = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
        k = torch.randn(3, T + T % 3, dtype=torch.float64, generator=g)  # extra taps are ignored
        worst = max(worst, rel_err(M.causal_conv(x, k, fft=fft), M.direct_causal_conv(x, k)))
    assert worst <= 1e-12, worst


@pytest.mark.parametrize("fft", PATHS)
def test_bidirectional_conv_equals_direct_convolution_float64(fft):
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for T in list(range(1, 20)) + [64, 97, 1000]:
        x = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
        k = torch.randn(3, T, dtype=torch.float64, generator=g)
        kr = torch.randn(3, max(T - 1, 0) + 2, dtype=torch.float64, generator=g)
        worst = max(worst, rel_err(M.bidirectional_conv(x, k, kr, fft=fft), M.direct_bidirectional_conv(x, k, kr)))
    assert worst <= 1e-12, worst


def test_direct_reference_is_the_definition():
    """The slow reference against the formula written out, element by element."""
    x, k = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    kr = torch.randn(3, 5, dtype=torch.float64)
    y, yb = M.direct_causal_conv(x, k), M.direct_bidirectional_conv(x, k, kr)
    for b in range(2):
        for t in range(6):
            for c in range(3):
                want = sum(k[c, s] * x[b, t - s, c] for s in range(t + 1))
                assert float(y[b, t, c]) == pytest.approx(float(want), abs=1e-12)
                want += sum(kr[c, s] * x[b, t + 1 + s, c] for s in range(6 - 1 - t))
                assert float(yb[b, t, c]) == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("fft", PATHS)
def test_float32_close_and_bf16_computed_in_float32(fft):
    x, k = torch.randn(2, 50, 4), torch.randn(4, 50)
    ref = M.direct_causal_conv(x.double(), k.double())
    assert rel_err(M.causal_conv(x, k, fft=fft).double(), ref) < 1e-5
    yb = M.causal_conv(x.bfloat16(), k.bfloat16(), fft=fft)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb.double(), M.direct_causal_conv(x.bfloat16().double(), k.bfloat16().double())) < 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_short_conv_equals_conv1d(causal):
    for K in (1, 2, 3, 4):
        for T in (1, 2, 3, 9):
            u, w, b = torch.randn(2, T, 5, dtype=torch.float64), torch.randn(5, K, dtype=torch.float64), \
                torch.randn(5, dtype=torch.float64)
            torch.testing.assert_close(M.short_conv(u, w, b, causal), M.short_conv_reference(u, w, b, causal))


@pytest.mark.parametrize("causal", [True, False])
def test_short_conv_gradcheck(causal):
    u = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, w, b: M.short_conv(u, w, b, causal), (u, w, b))
    assert torch.autograd.gradcheck(lambda u, w: M.short_conv(u, w, None, causal), (u, w))


@pytest.mark.parametrize("fft", PATHS)
@pytest.mark.parametrize("causal", [True, False])
def test_gated_conv_equals_reference_and_gradcheck(fft, causal):
    for T in (1, 2, 9, 40):
        u = torch.randn(2, T, 9, dtype=torch.float64, requires_grad=True)
        k = torch.randn(3, T, dtype=torch.float64, requires_grad=True)
        kr = torch.randn(3, T, dtype=torch.float64, requires_grad=True) if not causal else None
        assert rel_err(M.gated_conv(u, k, kr, fft=fft), M.gated_conv_reference(u, k, kr)) < 1e-12
        if T <= 9:
            args = (u, k) if causal else (u, k, kr)
            assert torch.autograd.gradcheck(lambda *a: M.gated_conv(*a, fft=fft), args)


# ----------------------------------------------------------------------------- causality and gradients
def _future_gradients(f, x: torch.Tensor) -> tuple[int, int]:
    """(# nonzero d y[:, t] / d x[:, t'] with t' > t, # zero ones with t' <= t) over all t."""
    y = f(x)
    future = past_zero = 0
    for t in range(x.shape[1]):
        (g,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        future += int((g[:, t + 1:] != 0).sum())
        past_zero += int((g[:, : t + 1] == 0).sum())
    return future, past_zero


@pytest.mark.parametrize("fft", PATHS)
def test_causal_conv_has_exactly_zero_gradient_from_the_future(fft):
    T = 23
    x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, T, dtype=torch.float64)
    future, past_zero = _future_gradients(lambda x: M.causal_conv(x, k, fft=fft), x)
    assert future == 0 and past_zero == 0
    x32 = x.detach().float().requires_grad_()
    assert _future_gradients(lambda x: M.causal_conv(x, k.float(), fft=fft), x32)[0] == 0


@pytest.mark.parametrize("fft", PATHS)
def test_conv_gradcheck_float64(fft):
    for T in (1, 6, 13):
        x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
        k = torch.randn(3, T + 2, dtype=torch.float64, requires_grad=True)
        kr = torch.randn(3, T, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, k: M.causal_conv(x, k, fft=fft), (x, k))
        assert torch.autograd.gradcheck(lambda x, k, kr: M.bidirectional_conv(x, k, kr, fft=fft), (x, k, kr))


def test_double_backward_is_refused_not_wrong():
    x = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(M.causal_conv(x, torch.randn(2, 5, dtype=torch.float64)).sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("case", [c for c in CASES if is_causal(c)])
def test_causal_mixers_have_exactly_zero_gradient_from_the_future(case):
    m = build(case, dtype=torch.float64)
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    assert _future_gradients(m, x)[0] == 0


def test_bidirectional_mixer_sees_the_future():
    m = build("mm-bidirectional-implicit-butterfly-dense", dtype=torch.float64)
    x = torch.randn(1, 9, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[:, 0].sum(), x)
    assert (g[:, 1:].abs().sum(-1) > 0).all()


# ----------------------------------------------------------------------------- generic module checks
@pytest.mark.parametrize("case", CASES)
def test_shapes_for_every_T_up_to_max_len(case):
    m = build(case)
    for T in (1, 2, 7, MAX_LEN):
        assert m(torch.randn(3, T, D)).shape == (3, T, D)
    assert m(torch.randn(0, 5, D)).shape == (0, 5, D)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64_inputs_and_parameters(case):
    m = build(case, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bf16_close_to_fp32(case):
    m = build(case)
    x = torch.randn(2, MAX_LEN, D)
    y = m(x)
    yb = m.to(torch.bfloat16)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    assert float((yb.float() - y).detach().norm() / y.detach().norm()) < 0.05


@pytest.mark.parametrize("case", ["mm-causal-implicit-torch",
                                  "mm-bidirectional-implicit-butterfly-dense", "attention-causal"])
def test_torch_compile_fullgraph(case):
    m = build(case)
    x = torch.randn(2, 12, D)
    y = m(x)  # eager first (the butterfly path's operators are built outside the graph)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    yc.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip(case):
    a, b = build(case, seed=0), build(case, seed=1)
    x = torch.randn(2, 9, D)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_meta_init_to_empty_load_state_dict(case):
    ref = build(case, seed=3)
    x = torch.randn(2, 10, D)
    m = build(case, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    m = m.to_empty(device="cpu")
    m.load_state_dict(ref.state_dict())
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    # and a fresh init after to_empty is a real init (finite, the same law as a normal build)
    m.reset_parameters()
    y = m(x)
    assert torch.isfinite(y).all() and 0.2 < float(y.std() / ref(x).std()) < 5


@pytest.mark.parametrize("case", CASES)
def test_deterministic_under_seed(case):
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(build(case, seed=5)(x), build(case, seed=5)(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_name_the_sizes_and_the_fix(case):
    m = build(case)
    with pytest.raises(ValueError, match=rf"T={MAX_LEN + 1} exceeds max_len={MAX_LEN}.*max_len >= {MAX_LEN + 1}"):
        m(torch.randn(1, MAX_LEN + 1, D))
    with pytest.raises(ValueError, match=rf"{D + 1} channels.*d={D}.*\(batch, T, {D}\)"):
        m(torch.randn(1, 4, D + 1))
    with pytest.raises(TypeError, match=r"int64 is not floating point.*x\.float\(\)"):
        m(torch.ones(1, 4, D, dtype=torch.long))
    with pytest.raises(TypeError, match=r"complex"):
        m(torch.randn(1, 4, D, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"empty sequence \(T=0\).*T >= 1"):
        m(torch.randn(1, 0, D))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(batch, T, d\)"):
        m(torch.randn(2, 4))


def test_conv_bad_inputs():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"k has 7 taps.*T=10.*at least 10"):
        M.causal_conv(x, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"k_rev has 5 taps.*at least 9"):
        M.bidirectional_conv(x, torch.randn(3, 10), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"k has shape \(4, 10\).*\(3, L >= 10\)"):
        M.causal_conv(x, torch.randn(4, 10))
    with pytest.raises(TypeError, match=r"k dtype torch.complex64"):
        M.causal_conv(x, torch.randn(3, 10, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"fft='monarh'.*'torch', 'monarch', 'butterfly'.*Did you mean 'monarch'"):
        M.causal_conv(x, torch.randn(3, 10), fft="monarh")
    with pytest.raises(ValueError, match=r"n=10 < 2T - 1 = 19"):
        M.long_conv(x.transpose(1, 2), torch.randn(3, 10), n=10)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"fft='torhc'.*Did you mean 'torch'"):
        M.MonarchMixer(8, 16, fft="torhc")
    with pytest.raises(ValueError, match=r"filter='implict'.*Did you mean 'implicit'"):
        M.MonarchMixer(8, 16, filter="implict")
    with pytest.raises(ValueError, match=r"unknown structure 'monarc'.*Did you mean 'monarch'"):
        M.MonarchMixer(8, 16, structure="monarc")
    with pytest.raises(ValueError, match=r"unknown sequence mixer 'atention'.*Did you mean 'attention'"):
        M.make_mixer("atention", 8, 16)
    with pytest.raises(TypeError, match=r"causal=1 must be True"):
        M.MonarchMixer(8, 16, causal=1)
    with pytest.raises(ValueError, match=r"max_len=0 is invalid"):
        M.MonarchMixer(8, 0)
    with pytest.raises(ValueError, match=r"d=10 is not divisible by heads=4"):
        M.Attention(10, 16, heads=4)
    with pytest.raises(ValueError, match=r"T=17 exceeds max_len=16"):
        M.ImplicitFilter(4, 16)(17)


# ----------------------------------------------------------------------------- filters
def test_implicit_filter_parameters_do_not_grow_with_T_and_prefixes_agree():
    small, big = M.ImplicitFilter(8, 64), M.ImplicitFilter(8, 65536)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in big.parameters())
    assert big(65536).shape == (8, 65536)
    f = M.ImplicitFilter(8, 100)
    torch.testing.assert_close(f(37), f(100)[:, :37], rtol=0, atol=0)
    e = M.ExplicitFilter(8, 100)
    assert sum(p.numel() for p in e.parameters()) == 8 * 100
    torch.testing.assert_close(e(37), e(100)[:, :37], rtol=0, atol=0)


def test_filters_init_to_unit_energy_and_decay():
    for f in (M.ImplicitFilter(16, 512), M.ExplicitFilter(16, 512)):
        h = f(512).detach()
        energy = h.pow(2).sum(1)
        assert float(energy.mean()) == pytest.approx(1.0, rel=1e-4)
        assert float(h[:, -64:].abs().max()) < float(h[:, :64].abs().max())  # the window decays


# ----------------------------------------------------------------------------- channel mixing from any structure
@pytest.mark.parametrize("name", deftly.structures())
def test_projections_and_mlp_from_every_registered_structure(name):
    cls = deftly.get(name)

    def linear(i, o):
        return deftly.make(name, i, o, **cls.examples(i, o)[0])

    block = M.MixerBlock(8, 12, linear=linear)
    for layer in (block.mixer.in_proj, block.mixer.out_proj, block.fc1, block.fc2):
        assert isinstance(layer, deftly.StructuredLinear) and layer.name == name
    x = torch.randn(2, 12, 8)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_default_projections_are_monarch():
    m = M.MonarchMixer(64, 32)
    assert m.in_proj.name == "monarch" and m.out_proj.name == "monarch"
    assert (m.in_proj.in_features, m.in_proj.out_features) == (64, 192)


def test_fft_paths_agree_inside_the_mixer():
    m = build("mm-causal-implicit-torch", dtype=torch.float64)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    y = m(x)
    for path in PATHS:
        m.fft = path
        assert rel_err(m(x), y) < 1e-12


def test_import_deftly_does_not_import_mixers():
    code = "import sys, deftly; assert 'deftly.mixers' not in sys.modules; import deftly.mixers"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- DDP on 2 processes
DDP_CASES = ["mm-causal-implicit-torch", "mm-bidirectional-implicit-butterfly-dense", "attention-causal"]
DDP_STEPS, DDP_BATCH, DDP_T = 2, 4, 10


def _ddp_batches():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(DDP_BATCH, DDP_T, D, generator=g, dtype=torch.float64),
             torch.randn(DDP_BATCH, DDP_T, D, generator=g, dtype=torch.float64)) for _ in range(DDP_STEPS)]


def _ddp_train(model, rows=slice(None)):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, target in _ddp_batches():
        opt.zero_grad()
        ((model(x[rows]) - target[rows]) ** 2).mean().backward()
        opt.step()


def _ddp_worker(workdir: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    half = DDP_BATCH // 2
    for case in DDP_CASES:
        model = DistributedDataParallel(build(case, dtype=torch.float64))
        _ddp_train(model, slice(rank * half, (rank + 1) * half))
        if rank == 0:
            torch.save(model.module.state_dict(), workdir / f"{case}.pt")
    dist.barrier()
    # the launcher counts a launch as passed when every rank exited 0 and wrote its results file
    (workdir / f"results_rank{rank}.json").write_text(json.dumps({"cases": DDP_CASES}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One launch of 2 workers (this file run as a script) by test_distributed's launcher: it starts the
    script at its module's ``__file__``, so that is pointed here for the launch."""
    workdir = tmp_path_factory.mktemp("mixers_ddp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td, "__file__", __file__)
        td.launch_workers(workdir, timeout=180)
    return workdir


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_two_processes_equal_one_process(ddp_run, case):
    ref = build(case, dtype=torch.float64)
    _ddp_train(ref)
    dist_state = torch.load(ddp_run / f"{case}.pt")
    assert dist_state.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(dist_state[k], v, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- char-LM with the mixer
def test_charlm_mixer_model_has_no_more_parameters_than_attention():
    from deftly.train.charlm import GPT

    attn = GPT(200, "dense", mixer="attention")
    mix = GPT(200, "dense", mixer="monarch-mixer")
    n_attn, n_mix = (sum(p.numel() for p in m.parameters()) for m in (attn, mix))
    assert n_mix <= n_attn
    idx = torch.randint(0, 200, (2, 128))
    assert mix(idx).shape == attn(idx).shape == (2, 128, 200)
    assert [type(m).__name__ for m in mix.linear_layers()][:2] == ["Dense", "Dense"]


@pytest.mark.parametrize("structure", ["dense", "monarch"])
def test_charlm_mixer_model_is_causal_end_to_end(structure):
    """The whole mixer GPT (embeddings, mixer blocks, MLPs, head) in float64: changing token t changes no
    logit before t (to rounding: the FFTs mix every position numerically) and does change logit t."""
    from deftly.train.charlm import GPT

    torch.manual_seed(0)
    model = GPT(100, structure, 0.25, layers=2, d=64, heads=4, ctx=32, mixer="monarch-mixer").double().eval()
    x = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        y = model(x)
        for t in (1, 5, 16, 31):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % 100
            change = (model(x2) - y).abs().amax(dim=(0, 2))  # (T,)
            assert float(change[:t].max()) < 1e-12 * float(y.abs().max()), (t, change[:t].max())
            assert float(change[t]) > 1e-3


def test_charlm_unknown_mixer_lists_choices():
    from deftly.train.charlm import CharLMConfig

    with pytest.raises(ValueError, match=r"mixer='monarch'.*attention, monarch-mixer"):
        CharLMConfig(mixer="monarch")


def test_charlm_recipe_end_to_end_with_the_mixer(tmp_path):
    from deftly.data import MissingDataError, wikipedia

    try:
        wikipedia.char_splits(limit=30_000)
    except MissingDataError as err:  # the text is an optional download
        pytest.skip(str(err))
    from deftly.train.charlm import CharLMConfig, run

    cfg = CharLMConfig(structures=("dense", "lowrank"), layers=1, d=32, heads=2, ctx=16, batch_size=4, steps=4,
                       warmup=1, eval_every=2, eval_windows=4, text_limit=30_000, clock="process",
                       mixer="monarch-mixer")
    res = run(cfg, tmp_path / "lm", progress=False)
    data = json.loads((tmp_path / "lm" / "results.json").read_text())
    dense, low = data["rows"]
    assert dense["steps"] == 4 and 0 < dense["val_bpc_equal_steps"] < 8
    assert low["linear_fraction"] <= 0.25
    assert any("monarch-mixer" in n for n in res["notes"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _ddp_worker(Path(sys.argv[2]))
