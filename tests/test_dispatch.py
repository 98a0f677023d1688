"""The dispatch behind ``StructuredLinear.forward`` (deftly.core.dispatch, controlled through deftly.kernels):
the deterministic static choice, opt-in tuning (its ``timer`` hook supplies the times: no wall-clock
assertions), forcing, non-plain inputs, every backend against the slow reference, and the lean forward's
caches: no traversals per call, invalidation by dtype/device/state/parameter swaps/parametrizations/
in-place edits, copies and pickles, torch.compile, functorch, autocast and inference mode.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
import deftly.kernels as K
from deftly.core import dispatch as engine

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    K.clear_cache()
    K.set_backend("auto")
    K.tune(False)
    yield
    K.tune(False)
    K.set_backend("auto")
    K.clear_cache()


# ------------------------------------------------------------------------------------------ static choice
def test_choice_is_deterministic_and_untimed():
    """The default never times anything: the same choice in two 'runs', and no timings recorded."""
    layer = deftly.make("monarch", 64, 64)
    x = torch.randn(8, 64)
    with torch.no_grad():
        first = K.choose(layer, x)
        layer(x)
    K.clear_cache()
    with torch.no_grad():
        assert K.choose(deftly.make("monarch", 64, 64), x) == first == "kernel"
    assert K.timings() == {}
    assert set(K.decisions().values()) == {"kernel"}
    assert K.lookup(layer, 8, torch.float32, "infer") == "kernel"


def test_static_rules_by_batch_mode_and_flops():
    bd = deftly.make("blockdiag", 64, 64, nblocks=4)
    for batch, train, want in [(8, False, "kernel"), (2048, False, "kernel"), (8, True, "native"),
                               (1024, True, "kernel")]:
        x = torch.randn(batch, 64, requires_grad=train)
        with torch.set_grad_enabled(train):
            assert K.choose(bd, x) == want, (batch, train)
    bf = deftly.make("butterfly", 64, 64)
    with torch.no_grad():
        assert K.choose(bf, torch.randn(1, 64)) == "kernel"
    assert K.choose(bf, torch.randn(1, 64, requires_grad=True)) == "native"
    assert K.choose(bf, torch.randn(64, 64, requires_grad=True)) == "kernel"
    # complex butterfly at 16x16: 1024 FLOPs per row > dense's 512: the cached dense weight in inference
    cx = deftly.make("butterfly", 16, 16, complex=True)
    assert cx.flops(1) > 2 * 16 * 16
    with torch.no_grad():
        assert K.choose(cx, torch.randn(2, 16)) == "dense"
    assert K.choose(cx, torch.randn(2, 16, requires_grad=True)) == "native"
    # a real-output map of complex twiddles: its dense weight Re(B) holds for real inputs only
    ro = deftly.make("butterfly", 30, 50, complex=True, perm="bitrev", real_output=True, dtype=F64)
    assert ro.flops(1) > 2 * 30 * 50
    xr = torch.randn(4, 30, dtype=F64)
    xc = torch.randn(4, 30, dtype=torch.complex128)
    with torch.no_grad():
        torch.testing.assert_close(ro(xr), ro.reference_forward(xr), rtol=1e-10, atol=1e-10)
        ro.kernel_backend = "dense"
        torch.testing.assert_close(ro(xc), ro.reference_forward(xc), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ro(xr), ro.reference_forward(xr), rtol=1e-10, atol=1e-10)
    frozen = deftly.make("blockdiag", 64, 64, nblocks=4).requires_grad_(False)
    assert K.choose(frozen, torch.randn(8, 64)) == "kernel"  # grad mode on, nothing to differentiate: infer
    assert K.choose(deftly.make("lowrank", 64, 64, rank=4), torch.randn(1, 64)) == "kernel"
    assert K.choose(deftly.make("kronecker", 64, 64), torch.randn(1, 64)) == "native"


# ------------------------------------------------------------------------------------------ tuning
def _fake_timer(times: dict[str, float]):
    calls = []

    def timer(name, fn):
        calls.append(name)
        return times[name]
    return timer, calls


def test_tune_picks_the_fastest_and_caches_per_bucket():
    layer = deftly.make("monarch", 64, 64)
    timer, calls = _fake_timer({"native": 3.0, "kernel": 2.0, "dense": 1.0})
    with K.tune(timer=timer), torch.no_grad():
        assert K.choose(layer, torch.randn(1, 64)) == "dense"
        n = len(calls)
        assert set(calls) == {"native", "kernel", "dense"}
        assert K.choose(layer, torch.randn(1, 64)) == "dense"
        layer(torch.randn(1, 64))
        assert len(calls) == n  # cached
    timer2, calls2 = _fake_timer({"native": 3.0, "kernel": 0.5, "dense": 1.0})
    K.tune(timer=timer2)  # the function form
    with torch.no_grad():
        assert K.choose(layer, torch.randn(50, 64)) == "kernel"  # bucket 64
        n2 = len(calls2)
        assert K.choose(layer, torch.randn(33, 64)) == "kernel"  # same bucket
        assert len(calls2) == n2
    assert K.choose(layer, torch.randn(50, 64)) == "kernel"  # train: its own key
    assert len(calls2) > n2
    K.tune(False)
    keys = K.decisions()
    assert {k[4] for k in keys} == {1, 64} and {k[-1] for k in keys} == {"infer", "train"}
    assert K.timings()[next(iter(keys))] == {"native": 3.0, "kernel": 2.0, "dense": 1.0}
    with torch.no_grad():  # tuning off: the tuned choice stays until clear_cache()
        assert K.choose(deftly.make("monarch", 64, 64), torch.randn(1, 64)) == "dense"
        K.clear_cache()
        assert K.choose(layer, torch.randn(1, 64)) == "kernel"


def test_tune_keeps_the_static_choice_within_the_margin():
    layer = deftly.make("monarch", 64, 64)
    timer, _ = _fake_timer({"native": 1.0, "kernel": 1.05, "dense": 2.0})
    with K.tune(timer=timer), torch.no_grad():
        assert K.choose(layer, torch.randn(8, 64)) == "kernel"  # the static choice, within 10%


def test_tune_prunes_by_flops_and_bytes(monkeypatch):
    layer = deftly.make("monarch", 256, 256)
    timer, calls = _fake_timer({"native": 1e-3, "kernel": 1e-3, "dense": 1e-9})
    monkeypatch.setattr(engine, "PEAK_BYTES", 1e6)  # reading the 256 KB dense weight takes >= 0.26 s
    with K.tune(timer=timer), torch.no_grad():
        assert K.choose(layer, torch.randn(1, 256)) == "kernel"
    assert "dense" not in calls


def test_env_var_turns_tuning_on():
    code = ("import torch, deftly, deftly.kernels as K\n"
            "l = deftly.make('blockdiag', 32, 32, nblocks=4)\n"
            "with torch.no_grad(): l(torch.randn(2, 32))\n"
            "print(sorted(next(iter(K.timings().values()))))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DEFTLY_TUNE": "1"},
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'kernel'" in out.stdout and "'native'" in out.stdout


# ------------------------------------------------------------------------------------------ forcing
def test_forcing_backends_global_context_and_layer(monkeypatch):
    torch.manual_seed(0)
    layer = deftly.make("monarch", 32, 48, dtype=torch.float32)
    x = torch.randn(5, 32)
    seen = []
    cls = type(layer)
    orig = cls.kernels["kernel"]

    def spy(*a, **kw):
        seen.append(1)
        return orig.fn(*a, **kw)
    monkeypatch.setattr(cls, "kernels", dict(cls.kernels))
    K.register_kernel(cls, "kernel", engine.KernelSpec(spy, default=True, bias=True))
    ref = layer.reference_forward(x)
    K.set_backend("native")
    assert K.choose(layer, x) == "native"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert not seen
    K.set_backend("kernel")
    assert K.choose(layer, x) == "kernel"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert seen
    K.set_backend("dense", "monarch")
    assert K.get_backend("monarch") == "dense"
    assert K.choose(layer, x) == "dense"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    K.set_backend("auto", "monarch")
    K.set_backend("auto")
    with K.use_backend("native"):
        assert K.choose(layer, x) == "native"
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert K.get_backend() == "auto"
    layer.kernel_backend = "dense"
    assert K.choose(layer, x) == "dense" and layer.kernel_backend == "dense"
    layer.kernel_backend = None
    assert K.choose(layer, x) == "kernel"
    kr = deftly.make("kronecker", 32, 48)
    K.set_backend("kernel")  # kronecker has no kernel: its static choice
    assert K.choose(kr, x) == "native"
    K.set_backend("auto")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        K.set_backend("fast")
    with pytest.raises(ValueError, match=r"unknown kernel backend 'kernal' for 'monarch'.*Did you mean 'kernel'"):
        layer.kernel_backend = "kernal"
    with pytest.raises(ValueError, match="unknown kernel backend 'kernel' for 'kronecker'"):
        kr.kernel_backend = "kernel"
    with pytest.raises(ValueError, match="unknown structure 'monarc'"):
        K.set_backend("kernel", "monarc")


def test_non_plain_inputs_take_the_structure_multiply():
    """FlopCounterMode (a dispatch mode) sees the structure's own multiply even with dense forced."""
    layer = deftly.make("monarch", 16, 16)
    layer.kernel_backend = "dense"
    x = torch.randn(5, 16)
    with FlopCounterMode(display=False) as fc:
        y = layer(x)
    assert fc.get_total_flops() == layer.flops(5)
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,hp", [("monarch", {}), ("blockdiag", {"nblocks": 4}), ("lowrank", {"rank": 4}),
                                     ("lrbd", {}), ("butterfly", {}), ("dense", {})])
def test_every_backend_agrees(name, hp):
    torch.manual_seed(0)
    layer = deftly.make(name, 16, 24, dtype=F64, **hp)
    for batch in (1, 7):
        x = torch.randn(batch, 16, dtype=F64, requires_grad=True)
        ref = layer.reference_forward(x)
        g = torch.randn_like(ref)
        want = torch.autograd.grad(ref, [x, *layer.parameters()], g)
        for b in K.backends(name):
            if b == "triton":
                continue
            layer.kernel_backend = b
            y = layer(x)
            torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=b)
            for a, c in zip(torch.autograd.grad(y, [x, *layer.parameters()], g), want):
                torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=b)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10, msg=b)


# ------------------------------------------------------------------------------------------ lean forward
def _allocations(fn) -> int:
    """Tensor allocations of one call of ``fn`` (the profiler's memory events), after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("name,hp", [("dense", {}), ("lowrank", {"rank": 8}), ("blockdiag", {"nblocks": 4}),
                                     ("monarch", {}), ("butterfly", {})])
def test_batch_one_forward_allocates_only_what_its_kernel_does(name, hp):
    """At batch 1 the forward allocates nothing beyond the chosen kernel's own tensors (its output and the
    structure's intermediates), plus the bias add for a kernel that does not take the bias itself: dense
    and block-diagonal allocate the output alone."""
    layer = deftly.make(name, 256, 256, **hp)
    x = torch.randn(1, 256)
    with torch.no_grad():
        got = _allocations(lambda: layer(x))
        backend = K.lookup(layer, 1, torch.float32, "infer")
        spec = type(layer).kernels[backend]
        args = getattr(layer, spec.args)()
        if spec.bias:
            want = _allocations(lambda: spec.fn(x, *args, bias=layer.bias))
        else:
            want = _allocations(lambda: spec.fn(x, *args)) + 1  # + the bias add
    assert got == want, (name, backend, got, want)
    if name in ("dense", "blockdiag"):
        assert got == 1


def test_forward_does_no_traversals_after_the_first_call(monkeypatch):
    """The fast path reads cached facts: parameters()/buffers()/modules()/hparams() are not called."""
    for name, hp in [("monarch", {}), ("blockdiag", {"nblocks": 4}), ("butterfly", {}), ("lrbd", {})]:
        layer = deftly.make(name, 16, 16, **hp)
        x = torch.randn(1, 16)
        with torch.no_grad():
            want = layer(x)

        def boom(*a, **k):
            raise AssertionError("traversal on the fast path")
        for attr in ("parameters", "named_parameters", "buffers", "modules", "hparams"):
            monkeypatch.setattr(layer, attr, boom, raising=False)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
            layer.kernel_backend = "native"  # toggling a forced backend re-derives nothing either
            torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
            layer.kernel_backend = None
        layer(x).sum().backward()  # training mode too


def test_small_batch_paths_see_in_place_weight_edits():
    """The no-gradient small-batch kernels keep contiguous transposes of the weights: an in-place edit
    (version bump), a ``.data`` swap (new storage) and a new layer must all be seen."""
    torch.manual_seed(0)
    for name, hp in [("monarch", {}), ("blockdiag", {"nblocks": 4})]:
        layer = deftly.make(name, 16, 16, **hp)
        x = torch.randn(2, 16)
        with torch.no_grad():
            y0 = layer(x)
            for p in layer.parameters():
                p.mul_(2.0)
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
            for p in layer.parameters():
                p.data = torch.randn_like(p)
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y0, layer(x))


def test_caches_follow_dtype_device_state_and_parameter_swaps():
    torch.manual_seed(0)
    layer = deftly.make("monarch", 32, 32)
    layer.kernel_backend = "dense"  # the cached dense weight is the cache most at risk
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer(x)
        layer.double()  # _apply: new dtype
        torch.testing.assert_close(layer(x.double()), layer.reference_forward(x.double()), rtol=1e-10,
                                   atol=1e-10)
        with pytest.raises(TypeError, match="does not match"):
            layer(x)
        other = deftly.make("monarch", 32, 32)
        layer.load_state_dict(other.state_dict(), assign=True)  # assign: back to float32 tensors
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)
        layer.R = torch.nn.Parameter(other.R * 2)  # attribute assignment
        want = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        # functional_call swaps parameters under the layer: the cached weight must not be reused
        swapped = {k: v * 3 for k, v in layer.state_dict().items()}
        ref = torch.func.functional_call(layer, swapped, (x,), strict=False)
        probe = deftly.make("monarch", 32, 32)
        probe.load_state_dict(swapped)
        torch.testing.assert_close(ref, probe.reference_forward(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_parametrized_layers_compute_their_parameters():
    """A parametrization (deftly.distributed stores complex parameters as (real, imag) this way) replaces
    ``_parameters`` entries by computed attributes: the forward must use the computed values."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(0)
    for name, hp in [("monarch", {}), ("blockdiag", {"nblocks": 4}), ("lowrank", {"rank": 4})]:
        layer = deftly.make(name, 16, 16, **hp)
        x = torch.randn(3, 16)
        with torch.no_grad():
            layer(x)  # facts and routes cached before the parametrization
            want = layer.reference_forward(x) + layer.bias  # the bias counted twice
        parametrize.register_parametrization(layer, "bias", Double())
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_do_not_share_caches():
    torch.manual_seed(0)
    layer = deftly.make("blockdiag", 32, 32, nblocks=4)
    layer.kernel_backend = "dense"
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = layer(x)
        twin = copy.deepcopy(layer)
        twin.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
        torch.testing.assert_close(twin(x), twin.reference_forward(x), rtol=1e-5, atol=1e-5)
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert back.kernel_backend == "dense"
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)


def test_dense_cache_reused_and_invalidated_by_optimizer_step():
    torch.manual_seed(0)
    layer = deftly.make("monarch", 32, 32)
    layer.kernel_backend = "dense"
    x = torch.randn(4, 32)
    with torch.no_grad():
        w1 = K.dense_weight(layer)
        assert K.dense_weight(layer) is w1  # cached while unchanged
        y1 = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 32)).pow(2).sum().backward()  # train mode: differentiable, never cached
    opt.step()
    with torch.no_grad():
        w2 = K.dense_weight(layer)
        assert w2 is not w1
        torch.testing.assert_close(w2, layer.to_dense(), rtol=1e-5, atol=1e-6)
        y2 = layer(x)
        assert not torch.allclose(y1, y2)
        torch.testing.assert_close(y2, layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        # load_state_dict (in-place copy) and .to(dtype) invalidate as well
        other = deftly.make("monarch", 32, 32)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)
        layer.to(F64)
        torch.testing.assert_close(layer(x.double()), layer.reference_forward(x.double()), rtol=1e-10,
                                   atol=1e-10)


def test_dense_backend_trains_parameters():
    torch.manual_seed(0)
    layer = deftly.make("blockdiag", 16, 16, nblocks=4, dtype=F64)
    x = torch.randn(3, 16, dtype=F64)
    layer.kernel_backend = "dense"
    g1 = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    layer.kernel_backend = "native"
    g2 = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("name", ["monarch", "blockdiag"])
def test_torch_compile_fullgraph_on_dispatched_layer(name):
    torch.manual_seed(0)
    layer = deftly.make(name, 32, 48, **({"nblocks": 4} if name == "blockdiag" else {}))
    x = torch.randn(6, 32, requires_grad=True)
    ref = layer(x)
    gref = torch.autograd.grad(ref.sum(), [x, *layer.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y.sum(), [x, *layer.parameters()]), gref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_functorch_autocast_inference_mode_fall_back_cleanly():
    torch.manual_seed(0)
    layer = deftly.make("monarch", 16, 16)
    x = torch.randn(3, 16)
    ref = layer.reference_forward(x)
    names = [n for n, _ in layer.named_parameters()]
    jac = torch.func.jacrev(lambda x: torch.func.functional_call(layer, dict(layer.named_parameters()), (x,)))(x)
    assert jac.shape == (3, 16, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # native path: autocast casts its bmm's
        torch.testing.assert_close(layer(x).float(), ref, rtol=0.05, atol=0.05)
        torch.testing.assert_close(layer(x.bfloat16()).float(), ref, rtol=0.05, atol=0.05)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    y = layer(x)  # buffers allocated in inference mode must serve autograd afterwards
    y.sum().backward()
    assert layer.R.grad is not None and names


def test_double_backward_needs_native_backend():
    layer = deftly.make("monarch", 8, 8, dtype=F64)
    x = torch.randn(2, 8, dtype=F64, requires_grad=True)
    layer.kernel_backend = "native"
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    g.sum().backward()  # fine through autograd's own bmm
    layer.kernel_backend = "kernel"
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
