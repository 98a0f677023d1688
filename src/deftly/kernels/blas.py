"""Block-diagonal multiply through the BLAS's batched GEMM, called directly with strides: no layout copy.

Shape contract (as :mod:`deftly.kernels.blockdiag`): ``x: (batch, k*p)``, ``W: (k, q, p)`` ->
``y: (batch, k*q)``, all row-major and contiguous. Block ``i`` of every operand is a pointer into the
tensor plus a leading dimension, so one ``?gemm_batch`` call computes all ``k`` blocks in place:

* forward ``y_i = x_i W_i^T`` -- column-major ``y_i^T (q x B, ld k*q) = W_i (q x p) . x_i^T (p x B, ld k*p)``;
* ``dx_i = gy_i W_i``       -- ``dx_i^T (p x B, ld k*p) = W_i^T (p x q) . gy_i^T (q x B, ld k*q)``;
* ``dW_i = gy_i^T x_i``     -- ``dW_i^T (p x q, ld p) = x_i^T (p x B) . gy_i (B x q)``.

``torch.bmm`` cannot express the strided output (CPU torch then loops block by block) and its fast
layouts need ``(k, batch, *)`` copies of ``x``, ``y`` and ``gy``. ``benchmarks/blas_direct.py`` times the
calls alone (outputs pre-allocated) against the layer; through the layer (fresh outputs, autograd) they
win where the copies are large: see :func:`preferred`.

The BLAS is the one inside PyTorch's CPU library: MKL's ``sgemm_batch`` / ``dgemm_batch`` (LP64), found
with ``ctypes`` on first use. Where the build has no MKL (e.g. aarch64 wheels with OpenBLAS)
:func:`available` is False and the dispatcher keeps the pure-PyTorch kernels. Under ``torch.compile``
this kernel is not traced (the dispatcher picks the custom-op kernel there). Thread count: MKL follows
``torch.set_num_threads``.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from typing import Any

import torch
from torch import Tensor

from . import _pool
from ._common import needs_grad, pad_cols

__all__ = ["BlasBlockDiagFunction", "available", "blockdiag_blas_backward", "blockdiag_blas_forward",
           "blockdiag_matmul_blas", "gemm_batch", "preferred", "usable"]

_INT_MAX = 2**31 - 1
#: the static choice (``python benchmarks/backend_grid.py``, one thread, n = 384..4096): this kernel from
#: :data:`MIN_BATCH` rows for blocks at least :data:`MIN_BLOCK` wide (0.84-1.08x the best pure-PyTorch
#: path's time at 1024-2048 rows, median 0.93, forward and forward+backward), and in training from
#: :data:`MIN_TRAIN_BATCH` rows for weights of at least :data:`TRAIN_WEIGHTS` entries (0.84-1.04x at
#: 16-2048 rows, median 0.94); slower outside those (up to 1.6x: ctypes' call and the pointer arrays
#: cost ~20 us, and MKL runs 32-wide blocks on 4 KB-strided rows slower)
MIN_BATCH = 1024
MIN_BLOCK = 64
MIN_TRAIN_BATCH = 16
TRAIN_WEIGHTS = 1 << 18


def preferred(weight_shape: tuple[int, ...], batch: int, train: bool) -> bool:
    """The static rule above for a block-diagonal weight of ``weight_shape = (k, q, p)``."""
    k, q, p = weight_shape
    return ((batch >= MIN_BATCH and min(q, p) >= MIN_BLOCK)
            or (train and batch >= MIN_TRAIN_BATCH and k * q * p >= TRAIN_WEIGHTS))


@cache
def _functions() -> dict[torch.dtype, Any] | None:
    """``{float32: sgemm_batch, float64: dgemm_batch}`` from PyTorch's own library, or None."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        fns = {torch.float32: lib.sgemm_batch, torch.float64: lib.dgemm_batch}
    except (OSError, AttributeError):
        return None
    for fn in fns.values():
        fn.restype = None
    return fns


def available() -> bool:
    """This PyTorch build exposes MKL's batched GEMM."""
    return _functions() is not None


def usable(x: Tensor) -> bool:
    """``x`` is a CPU float32/float64 tensor (the kernel's dtypes) and the BLAS was found."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and available()


@cache
def _byte_steps(count: int, step_bytes: int) -> Tensor:
    """``[0, step_bytes, 2 step_bytes, ...]`` (``count`` of them): the blocks' offsets, kept per layout."""
    return torch.arange(count, dtype=torch.int64) * step_bytes


def _pointers(t: Tensor, offset: int, step: int, count: int) -> Tensor:
    """``count`` addresses ``t + (offset + i * step) elements`` as an int64 tensor (kept alive by the
    caller during the call): one add per call on the hot path."""
    es = t.element_size()
    return _byte_steps(count, step * es) + (t.data_ptr() + offset * es)


def gemm_batch(ta: str, tb: str, m: int, n: int, k: int, a: Tensor, lda: int, a_step: int, b: Tensor, ldb: int,
               b_step: int, c: Tensor, ldc: int, c_step: int, count: int, *, a_offset: int = 0,
               b_offset: int = 0, c_offset: int = 0, beta: float = 0.0) -> None:
    """``count`` column-major GEMMs ``C_i = op(A_i) op(B_i) + beta C_i`` with ``A_i`` at element
    ``a_offset + i * a_step`` of ``a`` (likewise ``B``, ``C``); ``ta``/``tb`` are ``"N"`` or ``"T"``,
    ``ld*`` leading dimensions in elements. ``a``, ``b``, ``c``: contiguous CPU tensors of one dtype
    (float32/float64); the caller guarantees every block lies inside its tensor."""
    fns = _functions()
    if fns is None:
        raise RuntimeError("deftly.kernels.blas: this PyTorch build has no MKL gemm_batch; use the "
                           "'kernel' backend (deftly.kernels.set_backend('kernel', 'blockdiag'))")
    dt = c.dtype
    if a.dtype != dt or b.dtype != dt or dt not in fns:
        raise TypeError(f"gemm_batch: operands must share a float32/float64 dtype, got {a.dtype}, {b.dtype}, {dt}")
    if max(m, n, k, lda, ldb, ldc, count) > _INT_MAX:
        raise ValueError(f"gemm_batch: a size exceeds the 32-bit BLAS interface ({m}, {n}, {k}, {count})")
    if m == 0 or n == 0 or count == 0:
        return
    pa = _pointers(a, a_offset, a_step, count)
    pb = _pointers(b, b_offset, b_step, count)
    pc = _pointers(c, c_offset, c_step, count)
    i32 = ctypes.c_int
    real = ctypes.c_float if dt == torch.float32 else ctypes.c_double
    r = ctypes.byref
    ptr = ctypes.c_void_p
    fns[dt](r(ctypes.c_char(ta.encode())), r(ctypes.c_char(tb.encode())), r(i32(m)), r(i32(n)), r(i32(k)),
            r(real(1.0)), ptr(pa.data_ptr()), r(i32(lda)), ptr(pb.data_ptr()), r(i32(ldb)), r(real(beta)),
            ptr(pc.data_ptr()), r(i32(ldc)), r(i32(1)), r(i32(count)))


def blockdiag_blas_forward(x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``x: (batch, k*p)`` contiguous, ``weight: (k, q, p)`` contiguous -> ``y: (batch, k*q)`` (pooled, or
    written into the contiguous ``out``)."""
    k, q, p = weight.shape
    batch = x.shape[0]
    y = _pool.empty((batch, k * q), x.dtype, x.device) if out is None else _check_out(out, (batch, k * q), x)
    # y_i^T (q x B) = W_i (q x p) . x_i^T (p x B): W_i is row-major (q, p), i.e. column-major (p, q): "T"
    gemm_batch("T", "N", q, batch, p, weight, p, q * p, x, k * p, p, y, k * q, q, k)
    return y


def blockdiag_blas_backward(gy: Tensor, x: Tensor, weight: Tensor, need_x: bool = True, need_w: bool = True,
                            *, dx_out: Tensor | None = None, dw_out: Tensor | None = None
                            ) -> tuple[Tensor | None, Tensor | None]:
    """``dx = (batch, k*p)`` and ``dW = (k, q, p)`` of :func:`blockdiag_blas_forward` (contiguous inputs;
    written into ``dx_out`` / ``dw_out`` when given)."""
    k, q, p = weight.shape
    batch = x.shape[0]
    dx = dw = None
    if need_x:
        dx = (_pool.empty((batch, k * p), gy.dtype, gy.device) if dx_out is None
              else _check_out(dx_out, (batch, k * p), gy))
        # dx_i^T (p x B) = W_i^T (p x q) . gy_i^T (q x B)
        gemm_batch("N", "N", p, batch, q, weight, p, q * p, gy, k * q, q, dx, k * p, p, k)
    if need_w:
        dw = (torch.empty((k, q, p), dtype=weight.dtype, device=weight.device) if dw_out is None
              else _check_out(dw_out, (k, q, p), weight))
        # dW_i^T (p x q) = x_i^T (p x B) . gy_i (B x q)
        gemm_batch("N", "T", p, q, batch, x, k * p, p, gy, k * q, q, dw, p, q * p, k)
    return dx, dw


def _check_out(out: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if tuple(out.shape) != shape or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"deftly.kernels.blas: out= must be a contiguous {like.dtype} tensor of shape {shape}, got "
                         f"{tuple(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out


class BlasBlockDiagFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`blockdiag_blas_forward` / :func:`blockdiag_blas_backward` (first order)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return blockdiag_blas_forward(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors
        return blockdiag_blas_backward(gy.contiguous(), x, weight, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])


def blockdiag_matmul_blas(x: Tensor, weight: Tensor, in_index: Tensor | None, out_index: Tensor | None,
                          bias: Tensor | None = None) -> Tensor:
    """The block-diagonal layer's multiply ``(batch, in) -> (batch, out)`` (+ ``bias``) through
    :func:`gemm_batch`; the arguments of :func:`deftly.kernels.blockdiag_matmul`."""
    x = pad_cols(x, in_index).contiguous()
    w = weight.contiguous()
    if needs_grad(x, w):
        y = BlasBlockDiagFunction.apply(x, w)
    else:
        y = blockdiag_blas_forward(x, w)
    if out_index is not None:
        y = y.index_select(1, out_index)
    if bias is None:
        return y
    if not y.requires_grad and out_index is None and bias.dtype == y.dtype:
        return y.add_(bias)  # a fresh buffer only this call holds
    return y + bias
