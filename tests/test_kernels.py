"""Kernels (deftly.kernels) against the structures' slow references and float64 gradchecks, with the layers'
arguments on every path (small-batch no-grad, pooled, autograd), the buffer pool and (when installed)
Triton under its interpreter. The dispatch between kernels is tested in test_dispatch.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import deftly
import deftly.kernels as K
from deftly.kernels import _pool
from deftly.kernels.blockdiag import BlockDiagFunction, _blockdiag_op, blockdiag_matmul, blockdiag_native
from deftly.kernels.butterfly import butterfly_matmul
from deftly.kernels.monarch import MonarchFunction, _monarch_op, monarch_matmul, monarch_native

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
    K.clear_cache()
    K.set_backend("auto")
    K.tune(False)
    yield
    K.tune(False)
    K.set_backend("auto")
    K.clear_cache()


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


# ------------------------------------------------------------------------------------------ monarch
@pytest.mark.parametrize("size,hp", MONARCH)
@pytest.mark.parametrize("batch", [6, 1030])  # both layouts of dL (below / from DIRECT_DL_BATCH rows)
def test_monarch_kernel_matches_reference_and_dense(size, hp, batch):
    from deftly.kernels.monarch import DIRECT_DL_BATCH

    assert 6 < DIRECT_DL_BATCH <= 1030
    torch.manual_seed(0)
    i, o = size
    m = deftly.make("monarch", i, o, dtype=F64, **hp)
    x = torch.randn(batch, i, dtype=F64, requires_grad=True)
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


# ------------------------------------------------------------------------------------------ layer contract
def _padded(name, size, hp):
    torch.manual_seed(5)
    return deftly.make(name, *size, dtype=F64, **hp)


@pytest.mark.parametrize("name,size,hp", [("monarch", (16, 16), {}), ("monarch", (12, 20), MONARCH[1][1]),
                                          ("monarch", (7, 5), MONARCH[4][1]), ("blockdiag", (16, 16), {"nblocks": 4}),
                                          ("blockdiag", (12, 20), {"nblocks": 3}), ("blockdiag", (5, 7), {"nblocks": 5})])
@pytest.mark.parametrize("batch", [1, 3, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_kernels_every_path_equals_reference(name, size, hp, batch, bias):
    """monarch_matmul / blockdiag_matmul with the layer's arguments: the small-batch no-grad path (bias
    fused by baddbmm / the layout add), the pooled no-grad path and the autograd path, padded sizes too."""
    layer = _padded(name, size, hp)
    fn = monarch_matmul if name == "monarch" else blockdiag_matmul
    b = torch.randn(size[1], dtype=F64) if bias else None
    x = torch.randn(batch, size[0], dtype=F64)
    want = layer._reference_matmul(x) + (b if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(fn(x, *layer._kernel_args(), bias=b), want, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    y = fn(xg, *layer._kernel_args(), bias=b)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    ps = [p for n, p in layer.named_parameters() if n != "bias"]
    got = torch.autograd.grad(y, [xg, *ps], g)
    ref = torch.autograd.grad(layer._reference_matmul(xg), [xg, *ps], g)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ butterfly
@pytest.mark.parametrize("size,hp", BUTTERFLY)
def test_butterfly_blocked_matches_reference_and_dense(size, hp):
    torch.manual_seed(0)
    i, o = size
    layer = deftly.make("butterfly", i, o, dtype=F64, **hp)
    x = torch.randn(5, i, dtype=F64)
    ref = layer._reference_matmul(x)
    dense = x.to(layer.to_dense().dtype) @ layer.to_dense().T
    y = butterfly_matmul(x, *layer._kernel_args())
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, dense, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(layer._reference_matmul(xg), [xg, layer.twiddle], g)
    got = torch.autograd.grad(butterfly_matmul(xg, *layer._kernel_args()), [xg, layer.twiddle], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the cached-blocks path
        torch.testing.assert_close(butterfly_matmul(x, *layer._kernel_args()), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(butterfly_matmul(x, *layer._kernel_args()), ref, rtol=1e-10, atol=1e-10)


def test_butterfly_blocked_gradcheck_and_cache_invalidation():
    torch.manual_seed(4)
    layer = deftly.make("butterfly", 8, 8, depth=2, complex=True, dtype=F64)
    x = torch.randn(3, 8, dtype=F64)
    args = layer._kernel_args()
    tw = layer.twiddle.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda tw: butterfly_matmul(x, tw, *args[1:]), (tw,))
    with torch.no_grad():
        y0 = butterfly_matmul(x, *args)
        layer.twiddle.mul_(0.5)  # bumps the version: cached blocks must be rebuilt
        y1 = butterfly_matmul(x, *args)
        other = layer.twiddle.clone()  # another tensor with the same values: its own cache entry
        torch.testing.assert_close(butterfly_matmul(x, other, *args[1:]), y1, rtol=0, atol=0)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, layer._reference_matmul(x), rtol=1e-10, atol=1e-10)


def test_exact_fft_butterfly_blocked():
    layer = deftly.make("butterfly", 256, 256, init="fft")
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = butterfly_matmul(x, *layer._kernel_args())
    ref = torch.fft.fft(x.double())
    assert ((y.to(torch.complex128) - ref).abs().max() / ref.abs().max()).item() < 1e-5


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


# ------------------------------------------------------------------------------------------ BLAS (direct batched GEMM)
blas_only = pytest.mark.skipif(not K.blas.available(), reason="this torch build has no MKL gemm_batch")


@blas_only
@pytest.mark.parametrize("ta,tb", [("N", "N"), ("T", "N"), ("N", "T"), ("T", "T")])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gemm_batch_known_answers_with_strides_and_offsets(ta, tb, dtype):
    """Column-major C_i = op(A_i) op(B_i) + beta C_i on blocks carved out of larger tensors with leading
    dimensions and offsets, against one matmul per block."""
    torch.manual_seed(0)
    m, n, k, count = 5, 7, 3, 4
    lda, ldb, ldc = 11, 13, 9  # larger than the blocks: strided columns
    a_rows, b_rows = (m, k) if ta == "N" else (k, m), (k, n) if tb == "N" else (n, k)
    a = torch.randn(2 + count * 64, dtype=dtype)
    b = torch.randn(3 + count * 128, dtype=dtype)
    c = torch.randn(1 + count * 80, dtype=dtype)
    c0 = c.clone()

    def block(t, off, step, i, rows, cols, ld):  # column-major (rows x cols) with leading dimension ld
        return t.as_strided((rows, cols), (1, ld), off + i * step)

    K.blas.gemm_batch(ta, tb, m, n, k, a, lda, 64, b, ldb, 128, c, ldc, 80, count, a_offset=2, b_offset=3,
                      c_offset=1, beta=0.5)
    for i in range(count):
        A = block(a, 2, 64, i, *a_rows, lda)
        B = block(b, 3, 128, i, *b_rows, ldb)
        want = (A if ta == "N" else A.T) @ (B if tb == "N" else B.T) + 0.5 * block(c0, 1, 80, i, m, n, ldc)
        torch.testing.assert_close(block(c, 1, 80, i, m, n, ldc), want)
    untouched = torch.ones_like(c, dtype=torch.bool)
    for i in range(count):
        block(untouched, 1, 80, i, m, n, ldc).fill_(False)
    assert torch.equal(c[untouched], c0[untouched])  # nothing outside the blocks was written


@blas_only
@pytest.mark.parametrize("size,nb", BLOCKDIAG)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_blockdiag_blas_matches_reference_and_dense(size, nb, dtype):
    torch.manual_seed(0)
    i, o = size
    b = deftly.make("blockdiag", i, o, nblocks=nb, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-5}
    for batch in (0, 1, 5, 70):
        x = torch.randn(batch, i, dtype=dtype, requires_grad=True)
        ref = b._reference_matmul(x)
        g = torch.randn_like(ref)
        want = _grads(ref, [x, b.weight], g) if batch else None
        y = b.out_part.unpad(K.blas.BlasBlockDiagFunction.apply(b.in_part.pad(x), b.weight))
        torch.testing.assert_close(y, ref, **tol)
        torch.testing.assert_close(y, x @ b.to_dense().T, **tol)
        if batch:
            for a, c in zip(_grads(y, [x, b.weight], g), want):
                torch.testing.assert_close(a, c, **tol)


@blas_only
def test_blockdiag_blas_gradcheck():
    torch.manual_seed(2)
    b = deftly.make("blockdiag", 12, 20, nblocks=3, dtype=F64)
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    w = b.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: K.blas.BlasBlockDiagFunction.apply(b.in_part.pad(x), w), (x, w))


@blas_only
@pytest.mark.parametrize("size,nb", [((16, 16), 4), ((12, 20), 3), ((5, 7), 5)])
@pytest.mark.parametrize("batch", [1, 3, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_blockdiag_blas_layer_contract(size, nb, batch, bias):
    """blockdiag_matmul_blas with the layer's arguments (padded sizes, bias added in place without
    gradients), non-contiguous inputs, and through the layer when it is the forced backend."""
    layer = _padded("blockdiag", size, {"nblocks": nb})
    b = torch.randn(size[1], dtype=F64) if bias else None
    x = torch.randn(size[0], batch, dtype=F64).T  # non-contiguous
    want = layer._reference_matmul(x) + (b if bias else 0)
    with torch.no_grad():
        torch.testing.assert_close(K.blas.blockdiag_matmul_blas(x, *layer._kernel_args(), bias=b), want,
                                   rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    y = K.blas.blockdiag_matmul_blas(xg, *layer._kernel_args(), bias=b)
    g = torch.randn_like(want)
    got = torch.autograd.grad(y, [xg, layer.weight], g)
    ref = torch.autograd.grad(layer._reference_matmul(xg), [xg, layer.weight], g)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    layer.kernel_backend = "blas"
    torch.testing.assert_close(layer(x), layer._reference_matmul(x) + layer.bias, rtol=1e-12, atol=1e-12)


@blas_only
def test_blockdiag_blas_writes_into_given_outputs():
    """``out=`` / ``dx_out=`` / ``dw_out=`` (what benchmarks/blas_direct.py times) hold the same values as
    fresh outputs; a wrong out is refused, naming what it must be."""
    torch.manual_seed(4)
    b = deftly.make("blockdiag", 12, 20, nblocks=4, bias=False, dtype=F64)
    x, gy = torch.randn(7, 12, dtype=F64), torch.randn(7, 20, dtype=F64)
    w = b.weight.detach()
    y = torch.full((7, 20), float("nan"), dtype=F64)
    dx, dw = torch.full_like(x, float("nan")), torch.full_like(w, float("nan"))
    assert K.blas.blockdiag_blas_forward(x, w, out=y) is y
    torch.testing.assert_close(y, x @ b.to_dense().T, rtol=1e-12, atol=1e-12)
    got = K.blas.blockdiag_blas_backward(gy, x, w, dx_out=dx, dw_out=dw)
    assert got[0] is dx and got[1] is dw
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    want = torch.autograd.grad(b.out_part.unpad(blockdiag_native(xr, wr)), [xr, wr], gy)
    for a, c in zip((dx, dw), want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"out= must be a contiguous torch.float64 tensor of shape \(7, 20\)"):
        K.blas.blockdiag_blas_forward(x, w, out=torch.empty(20, 7, dtype=F64).T)


def test_without_mkl_the_blas_backend_is_not_offered(monkeypatch):
    """A torch build without MKL's gemm_batch (aarch64, OpenBLAS): the dispatcher keeps the pure-PyTorch
    kernels and a direct call says what to use instead."""
    monkeypatch.setattr(K.blas, "_functions", lambda: None)
    K.clear_cache()
    layer = deftly.make("blockdiag", 64, 64, nblocks=4)
    x = torch.randn(300, 64)
    assert "blas" not in K.backends(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)
    assert K.lookup(layer, 300, torch.float32, "infer") == "kernel"
    with pytest.raises(RuntimeError, match="no MKL gemm_batch; use the 'kernel' backend"):
        K.blas.gemm_batch("N", "N", 1, 1, 1, x, 1, 0, x, 1, 0, x, 1, 0, 1)


@blas_only
def test_static_choice_takes_blas_from_min_batch_for_wide_blocks():
    """Decisions are cached per power-of-two bucket of rows; buckets wholly at or above MIN_BATCH take
    the BLAS kernel for blocks at least MIN_BLOCK wide, in training and inference; thin blocks and
    smaller buckets keep the pure-PyTorch paths."""
    w = K.blas.MIN_BLOCK
    wide = deftly.make("blockdiag", 2 * w, 2 * w, nblocks=2)
    thin = deftly.make("blockdiag", 2 * w, 2 * w, nblocks=4)
    low, high = K.blas.MIN_BATCH // 2, K.blas.MIN_BATCH
    for layer in (wide, thin):
        for batch in (low, high):
            layer(torch.randn(batch, 2 * w, requires_grad=True)).sum().backward()
            with torch.no_grad():
                layer(torch.randn(batch, 2 * w))
    for mode in ("train", "infer"):
        assert K.lookup(wide, high, torch.float32, mode) == "blas"
        assert K.lookup(wide, low, torch.float32, mode) != "blas"
        assert K.lookup(thin, high, torch.float32, mode) == "kernel"


def test_static_choice_trains_large_block_diagonal_weights_with_the_kernel():
    """Below 1024 rows in training: the plain bmm for small weights, the pooled kernel from
    KERNEL_TRAIN_WEIGHTS weights (its hand-written backward wins there at any batch size)."""
    from deftly.layers.blockdiag import KERNEL_TRAIN_WEIGHTS

    n = 512
    big = deftly.make("blockdiag", n, n, nblocks=n * n // KERNEL_TRAIN_WEIGHTS)
    small = deftly.make("blockdiag", n, n, nblocks=2 * n * n // KERNEL_TRAIN_WEIGHTS)
    assert big.weight.numel() == KERNEL_TRAIN_WEIGHTS > small.weight.numel()
    x = torch.randn(K.blas.MIN_TRAIN_BATCH // 2, n, requires_grad=True)
    assert K.choose(big, x) == "kernel"
    assert K.choose(small, x) == "native"
    y = big(x)
    torch.testing.assert_close(y, x @ big.to_dense().T + big.bias, rtol=1e-5, atol=1e-5)
    if K.blas.available():  # and from MIN_TRAIN_BATCH rows the BLAS calls for weights >= TRAIN_WEIGHTS
        assert K.blas.TRAIN_WEIGHTS <= big.weight.numel()
        xb = torch.randn(K.blas.MIN_TRAIN_BATCH, n, requires_grad=True)
        assert K.choose(big, xb) == "blas"
        assert K.choose(small, xb) == "native"
        with torch.no_grad():
            assert K.choose(big, xb) == "kernel"  # inference below MIN_BATCH rows
