"""Kernels (deftly.kernels) against the structures' slow references, gradchecks, the dispatcher's choices,
forcing, dense-cache invalidation, the buffer pool, torch.compile and (when installed) Triton under its
interpreter. No wall-clock assertions: timing is replaced by fake measurements where a choice is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import deftly
import deftly.kernels as K
from deftly.kernels import _pool, dispatch
from deftly.kernels.blockdiag import BlockDiagFunction, _blockdiag_op, blockdiag_native
from deftly.kernels.butterfly import butterfly_blocked_matmul
from deftly.kernels.monarch import MonarchFunction, _monarch_op, monarch_native

F64 = torch.float64

MONARCH = [((16, 16), {}), ((12, 20), {"nblocks": 3, "out_blocks": 2, "rank": 2}),
           ((30, 45), {"nblocks": 5, "out_blocks": 3, "rank": 3}), ((64, 32), {"nblocks": 8, "out_blocks": 4}),
           ((7, 5), {"nblocks": 2, "out_blocks": 3, "rank": 1})]
BLOCKDIAG = [((16, 16), 4), ((12, 20), 3), ((20, 12), 5), ((64, 64), 8), ((5, 7), 5)]
BUTTERFLY = [((16, 16), {}), ((12, 20), {"depth": 2, "complex": True}), ((20, 12), {"init": "dct"}),
             ((64, 64), {"init": "fft"}), ((30, 50), {"depth": 3}), ((2, 2), {}), ((3, 5), {"depth": 2}),
             ((32, 32), {"init": "hadamard"}), ((20, 24), {"init": "fft"}), ((8, 8), {"init": "fft", "depth": 2}),
             ((6, 6), {"complex": True, "real_output": True, "perm": "bitrev"})]


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    dispatch.clear_cache()
    K.set_backend("auto")
    yield
    K.set_backend("auto")
    dispatch.clear_cache()


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


# ------------------------------------------------------------------------------------------ monarch
@pytest.mark.parametrize("size,hp", MONARCH)
def test_monarch_kernel_matches_reference_and_dense(size, hp):
    torch.manual_seed(0)
    i, o = size
    m = deftly.make("monarch", i, o, dtype=F64, **hp)
    x = torch.randn(6, i, dtype=F64, requires_grad=True)
    pad = m.in_part.pad
    ref = m._reference_matmul(x)
    dense = x @ m.to_dense().T
    g = torch.randn_like(ref)
    want = _grads(ref, [x, m.R, m.L], g)
    for f in (lambda: MonarchFunction.apply(pad(x), m.R, m.L, m.rank),
              lambda: monarch_native(pad(x), m.R, m.L, m.rank),
              lambda: _monarch_op(pad(x), m.R, m.L, m.rank)[0]):
        y = f()[:, :o]
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, dense, rtol=1e-12, atol=1e-12)
        for a, b in zip(_grads(y, [x, m.R, m.L], g), want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size,hp", [((8, 8), {}), ((6, 10), {"nblocks": 3, "out_blocks": 2, "rank": 2})])
def test_monarch_kernel_gradcheck(size, hp):
    torch.manual_seed(1)
    m = deftly.make("monarch", *size, dtype=F64, **hp)
    x = torch.randn(3, size[0], dtype=F64, requires_grad=True)
    R = m.R.detach().clone().requires_grad_(True)
    L = m.L.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, R, L: MonarchFunction.apply(m.in_part.pad(x), R, L, m.rank),
                                    (x, R, L))


# ------------------------------------------------------------------------------------------ blockdiag
@pytest.mark.parametrize("size,nb", BLOCKDIAG)
@pytest.mark.parametrize("strided", [False, True])
def test_blockdiag_kernel_matches_reference_and_dense(size, nb, strided):
    torch.manual_seed(0)
    i, o = size
    b = deftly.make("blockdiag", i, o, nblocks=nb, dtype=F64)
    x = torch.randn(5, i, dtype=F64, requires_grad=True)
    ref = b._reference_matmul(x)
    g = torch.randn_like(ref)
    want = _grads(ref, [x, b.weight], g)
    pad = b.in_part.pad
    for f in (lambda: BlockDiagFunction.apply(pad(x), b.weight, strided),
              lambda: blockdiag_native(pad(x), b.weight), lambda: _blockdiag_op(pad(x), b.weight)):
        y = b.out_part.unpad(f())
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, x @ b.to_dense().T, rtol=1e-12, atol=1e-12)
        for a, c in zip(_grads(y, [x, b.weight], g), want):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strided", [False, True])
def test_blockdiag_kernel_gradcheck(strided):
    torch.manual_seed(2)
    b = deftly.make("blockdiag", 12, 20, nblocks=3, dtype=F64)
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    w = b.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: BlockDiagFunction.apply(b.in_part.pad(x), w, strided), (x, w))


def test_custom_ops_pass_opcheck():
    torch.manual_seed(3)
    m = deftly.make("monarch", 12, 20, nblocks=3, out_blocks=2, rank=2, dtype=F64)
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    torch.library.opcheck(_monarch_op, (m.in_part.pad(x), m.R, m.L, m.rank))
    b = deftly.make("blockdiag", 16, 16, nblocks=4, dtype=F64)
    torch.library.opcheck(_blockdiag_op, (torch.randn(3, 16, dtype=F64, requires_grad=True), b.weight))


# ------------------------------------------------------------------------------------------ butterfly
@pytest.mark.parametrize("size,hp", BUTTERFLY)
def test_butterfly_blocked_matches_reference_and_dense(size, hp):
    torch.manual_seed(0)
    i, o = size
    layer = deftly.make("butterfly", i, o, dtype=F64, **hp)
    x = torch.randn(5, i, dtype=F64)
    ref = layer._reference_matmul(x)
    dense = x.to(layer.to_dense().dtype) @ layer.to_dense().T
    y = butterfly_blocked_matmul(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, dense, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(layer._reference_matmul(xg), [xg, layer.twiddle], g)
    got = torch.autograd.grad(butterfly_blocked_matmul(layer, xg), [xg, layer.twiddle], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the cached-blocks path
        torch.testing.assert_close(butterfly_blocked_matmul(layer, x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(butterfly_blocked_matmul(layer, x), ref, rtol=1e-10, atol=1e-10)


def test_butterfly_blocked_gradcheck_and_cache_invalidation():
    torch.manual_seed(4)
    layer = deftly.make("butterfly", 8, 8, depth=2, complex=True, dtype=F64)
    x = torch.randn(3, 8, dtype=F64)
    tw = layer.twiddle.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda tw: butterfly_blocked_matmul(_with(layer, tw), x), (tw,))
    with torch.no_grad():
        y0 = butterfly_blocked_matmul(layer, x)
        layer.twiddle.mul_(0.5)  # bumps the version: cached blocks must be rebuilt
        y1 = butterfly_blocked_matmul(layer, x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, layer._reference_matmul(x), rtol=1e-10, atol=1e-10)


def _with(layer, tw):
    """A shallow stand-in for ``layer`` whose twiddles are ``tw`` (for gradcheck)."""
    class _L:
        pass
    s = _L()
    for k in ("n", "log_n", "depth", "perm", "in_features", "out_features", "real_output", "gather_index",
              "_strides"):
        setattr(s, k, getattr(layer, k))
    s.twiddle = tw
    return s


def test_exact_fft_butterfly_blocked():
    layer = deftly.make("butterfly", 256, 256, init="fft")
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = butterfly_blocked_matmul(layer, x)
    ref = torch.fft.fft(x.double())
    assert ((y.to(torch.complex128) - ref).abs().max() / ref.abs().max()).item() < 1e-5


# ------------------------------------------------------------------------------------------ dispatch
def _fake_timer(times: dict[str, float]):
    """A stand-in for dispatch._time_once: the listed time of the backend a tuning step would run."""
    calls = []

    def time_once(fn):
        name = fn.__defaults__[0]
        calls.append(name)
        return times[name]
    return time_once, calls


def test_dispatch_picks_the_fastest_and_caches_per_bucket(monkeypatch):
    layer = deftly.make("monarch", 64, 64)
    time_once, calls = _fake_timer({"native": 3.0, "kernel": 2.0, "dense": 1.0})
    monkeypatch.setattr(dispatch, "_time_once", time_once)
    monkeypatch.setattr(dispatch, "PEAK_FLOPS", float("inf"))  # no pruning
    monkeypatch.setattr(dispatch, "PEAK_BYTES", float("inf"))
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert dispatch.choose(layer, x, layer._matmul) == "dense"
        n = len(calls)
        assert set(calls) == {"native", "kernel", "dense"}
        assert dispatch.choose(layer, torch.randn(1, 64), layer._matmul) == "dense"
        assert len(calls) == n  # cached
    time_once2, calls2 = _fake_timer({"native": 3.0, "kernel": 0.5, "dense": 1.0})
    monkeypatch.setattr(dispatch, "_time_once", time_once2)
    with torch.no_grad():
        assert dispatch.choose(layer, torch.randn(50, 64), layer._matmul) == "kernel"  # bucket 64
        n2 = len(calls2)
        assert dispatch.choose(layer, torch.randn(33, 64), layer._matmul) == "kernel"  # same bucket
        assert len(calls2) == n2
    assert dispatch.choose(layer, torch.randn(50, 64), layer._matmul) == "kernel"  # train: its own key
    assert len(calls2) > n2
    keys = dispatch.decisions()
    assert {k[4] for k in keys} == {1, 64} and {k[-1] for k in keys} == {"infer", "train"}
    assert dispatch.timings()[next(iter(keys))] == {"native": 3.0, "kernel": 2.0, "dense": 1.0}


def test_dispatch_keeps_the_default_within_the_margin(monkeypatch):
    layer = deftly.make("monarch", 64, 64)
    time_once, _ = _fake_timer({"native": 1.0, "kernel": 1.05, "dense": 2.0})
    monkeypatch.setattr(dispatch, "_time_once", time_once)
    monkeypatch.setattr(dispatch, "PEAK_FLOPS", float("inf"))
    monkeypatch.setattr(dispatch, "PEAK_BYTES", float("inf"))
    with torch.no_grad():
        assert dispatch.choose(layer, torch.randn(8, 64), layer._matmul) == "kernel"  # default, within 10%


def test_dispatch_prunes_by_flops_and_bytes(monkeypatch):
    layer = deftly.make("monarch", 256, 256)
    time_once, calls = _fake_timer({"native": 1e-3, "kernel": 1e-3, "dense": 1e-9})
    monkeypatch.setattr(dispatch, "_time_once", time_once)
    monkeypatch.setattr(dispatch, "PEAK_FLOPS", float("inf"))
    monkeypatch.setattr(dispatch, "PEAK_BYTES", 1e6)  # reading the 256 KB dense weight takes >= 0.26 s
    with torch.no_grad():
        assert dispatch.choose(layer, torch.randn(1, 256), layer._matmul) == "kernel"
    assert "dense" not in calls


def test_forcing_backends_global_context_and_layer(monkeypatch):
    torch.manual_seed(0)
    layer = deftly.make("monarch", 32, 48, dtype=torch.float32)
    x = torch.randn(5, 32)
    seen = []
    orig = dispatch._BACKENDS["monarch"]["kernel"]
    spy = dispatch.Backend("kernel", lambda lay, xx: (seen.append(1), orig.fn(lay, xx))[1],
                           plain_only=True)
    monkeypatch.setitem(dispatch._BACKENDS["monarch"], "kernel", spy)
    ref = layer.reference_forward(x)
    K.set_backend("kernel")
    assert dispatch.choose(layer, x, layer._matmul) == "kernel"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert seen
    K.set_backend("dense", "monarch")
    assert K.get_backend("monarch") == "dense"
    assert dispatch.choose(layer, x, layer._matmul) == "dense"
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    K.set_backend("auto", "monarch")
    K.set_backend("auto")
    with K.use_backend("native"):
        assert dispatch.choose(layer, x, layer._matmul) == "native"
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert K.get_backend() == "auto"
    layer.kernel_backend = "dense"
    assert dispatch.choose(layer, x, layer._matmul) == "dense"
    lr = deftly.make("lowrank", 32, 48)
    K.set_backend("kernel")  # lowrank has no kernel: falls back to its default
    assert dispatch.choose(lr, x, lr._matmul) == "native"
    K.set_backend("auto")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        K.set_backend("fast")
    layer.kernel_backend = "fast"
    with pytest.raises(ValueError, match="unknown kernel backend 'fast' for 'monarch'"):
        layer(x)


@pytest.mark.parametrize("name,hp", [("monarch", {}), ("blockdiag", {"nblocks": 4}), ("lowrank", {"rank": 4}),
                                     ("lrbd", {}), ("butterfly", {})])
def test_every_backend_agrees(name, hp):
    torch.manual_seed(0)
    layer = deftly.make(name, 16, 24, dtype=F64, **hp)
    x = torch.randn(7, 16, dtype=F64, requires_grad=True)
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


def test_dense_cache_reused_and_invalidated_by_optimizer_step():
    torch.manual_seed(0)
    layer = deftly.make("monarch", 32, 32)
    layer.kernel_backend = "dense"
    x = torch.randn(4, 32)
    with torch.no_grad():
        w1 = K.dense_weight(layer, None)
        assert K.dense_weight(layer, None) is w1  # cached while unchanged
        y1 = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 32)).pow(2).sum().backward()  # train mode: differentiable, never cached
    opt.step()
    with torch.no_grad():
        w2 = K.dense_weight(layer, None)
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


# ------------------------------------------------------------------------------------------ pool
def test_pool_reuses_only_released_buffers():
    _pool.clear()
    a = _pool.empty((512, 1024), torch.float32)
    ptr = a.data_ptr()
    view = a[10:]
    del a
    b = _pool.empty((512, 1024), torch.float32)
    assert b.data_ptr() != ptr  # a view of the first buffer is still alive
    del view
    c = _pool.empty((512, 1024), torch.float32)
    assert c.data_ptr() == ptr
    assert _pool.empty((4, 4), torch.float32).numel() == 16  # small: plain allocation


def test_outputs_stay_valid_across_calls():
    torch.manual_seed(0)
    layer = deftly.make("monarch", 512, 512, dtype=torch.float32, bias=False)  # 1 MB buffers: pooled
    layer.kernel_backend = "kernel"
    x1, x2 = torch.randn(512, 512), torch.randn(512, 512)
    with torch.no_grad():
        y1 = layer(x1)
        keep = y1.clone()
        y2 = layer(x2)
        y3 = layer(x1)
    torch.testing.assert_close(y1, keep, rtol=0, atol=0)
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y3, keep, rtol=0, atol=0)
    # in training, the saved activations of two pending graphs must not share buffers either
    xa, xb = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    ya, yb = layer(xa), layer(xb)
    ga = torch.autograd.grad(ya.sum(), [xa, layer.R])
    gb = torch.autograd.grad(yb.sum(), [xb, layer.R])
    layer.kernel_backend = "native"
    ra = torch.autograd.grad(layer(xa).sum(), [xa, layer.R])
    rb = torch.autograd.grad(layer(xb).sum(), [xb, layer.R])
    for u, v in zip(ga + gb, ra + rb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ triton
_TRITON_SCRIPT = r"""
import torch, deftly
from deftly.kernels import triton_kernels as T
torch.manual_seed(0)
for name, hp in [("monarch", dict(nblocks=3, out_blocks=2, rank=2)), ("blockdiag", dict(nblocks=3))]:
    ref_layer = deftly.make(name, 12, 20, dtype=torch.float64, **hp)  # bf16 forward+backward vs float64
    x64 = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    ref = ref_layer.reference_forward(x64)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x64, *ref_layer.parameters()], g)
    low = deftly.make(name, 12, 20, dtype=torch.bfloat16, **hp)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref_layer.state_dict().items()})
    low.kernel_backend = "triton"
    xb = x64.detach().to(torch.bfloat16).requires_grad_(True)
    y = low(xb)
    got = torch.autograd.grad(y, [xb, *low.parameters()], g.to(torch.bfloat16))
    for a, b in zip((y, *got), (ref, *want)):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 3e-2, (name, err)
for (i, o, kw) in [(12, 20, dict(nblocks=3, out_blocks=2, rank=2))]:
    m = deftly.make("monarch", i, o, **kw)
    x = torch.randn(5, i, requires_grad=True)
    y = T.monarch_triton(m.in_part.pad(x), m.R, m.L, m.rank)[:, :o]
    ref = m._reference_matmul(x)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, [x, m.R, m.L], g), torch.autograd.grad(ref, [x, m.R, m.L], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
for (i, o, nb) in [(12, 20, 3)]:
    l = deftly.make("blockdiag", i, o, nblocks=nb)
    x = torch.randn(5, i, requires_grad=True)
    l.kernel_backend = "triton"
    y = l(x)
    ref = l.reference_forward(x)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, [x, l.weight], g), torch.autograd.grad(ref, [x, l.weight], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
