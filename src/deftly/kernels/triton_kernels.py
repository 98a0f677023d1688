"""Triton kernels for block-diagonal and Monarch multiplies, forward and backward (GPU; fp32 and bf16).

``import triton`` happens only inside :func:`_kernels`, on first use. One batched-GEMM kernel serves every
step: operands and output are addressed through arbitrary strides, and an index of the ``k`` (reduction)
or ``n`` (output column) axis may be split as ``(idx // r, idx % r)`` with a stride each, so the Monarch
permutations ``P`` and ``P^T`` live in the address arithmetic: the two block products read ``x`` and
write ``y`` in place and nothing is copied (forward: 2 launches, backward: 4).

On a CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check them; the dispatcher offers ``"triton"`` only for CUDA tensors.
fp32 uses IEEE products (no TF32); bf16 accumulates in fp32. Under the interpreter (triton 3.9) a bf16
``tl.dot`` returns garbage (measured: max error 2e10 on a 16x16 product), so there bf16/fp16 operands are
upcast to fp32 before the product; on a GPU the product runs in bf16 on the tensor cores.
Not measured on a GPU in this project yet: ``python benchmarks/gpu_triton.py`` is the prepared check.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

__all__ = ["available", "blockdiag_triton", "bmm_strided", "monarch_triton"]


def available(device: torch.device | str | None = None) -> bool:
    """Triton importable and the device is CUDA (or the interpreter is on)."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):  # pragma: no cover
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and torch.device(device).type == "cuda"


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def bmm_kernel(A, B, C, M, N, K,
                   sab, sam, sak1, sak2, sbb, sbk1, sbk2, sbn, scb, scm, scn1, scn2,
                   RK: tl.constexpr, RN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_b = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_base = A + pid_b * sab
        b_base = B + pid_b * sbb
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            ka = (kk // RK) * sak1 + (kk % RK) * sak2
            kb = (kk // RK) * sbk1 + (kk % RK) * sbk2
            a = tl.load(a_base + offs_m[:, None] * sam + ka[None, :],
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_base + kb[:, None] + offs_n[None, :] * sbn,
                        mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)
            if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong: multiply in fp32 there
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            elif IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        cn = (offs_n // RN) * scn1 + (offs_n % RN) * scn2
        c_ptr = C + pid_b * scb + offs_m[:, None] * scm + cn[None, :]
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    return triton, bmm_kernel


#: the largest tile side (BLOCK_M/N/K) of a launch; benchmarks/gpu_triton.py tries 64 and 128
TILE_CAP = 64


def _blk(v: int) -> int:
    return max(16, min(TILE_CAP, 1 << (max(v, 1) - 1).bit_length()))


def bmm_strided(a: tuple, b: tuple, c: tuple, nbatch: int, M: int, N: int, K: int, rk: int = 1, rn: int = 1
                ) -> None:
    """``c[i] = a[i] @ b[i]`` for ``i < nbatch`` with explicit strides.

    ``a = (tensor, s_batch, s_m, s_k1, s_k2)``, ``b = (tensor, s_batch, s_k1, s_k2, s_n)``,
    ``c = (tensor, s_batch, s_m, s_n1, s_n2)``; reduction index ``kk`` sits at ``(kk // rk) * s_k1 +
    (kk % rk) * s_k2`` and output column ``n`` at ``(n // rn) * s_n1 + (n % rn) * s_n2``.
    """
    triton, kern = _kernels()
    A, sab, sam, sak1, sak2 = a
    B, sbb, sbk1, sbk2, sbn = b
    C, scb, scm, scn1, scn2 = c
    bm, bn, bk = _blk(M), _blk(N), _blk(K)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), nbatch)
    kern[grid](A, B, C, M, N, K, sab, sam, sak1, sak2, sbb, sbk1, sbk2, sbn, scb, scm, scn1, scn2,
               RK=rk, RN=rn, IEEE=A.dtype == torch.float32,
               UPCAST=A.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


# ------------------------------------------------------------------------------------------ blockdiag
def _bd_fwd(x: Tensor, w: Tensor) -> Tensor:
    k, q, p = w.shape
    batch = x.shape[0]
    x = x.contiguous()
    y = x.new_empty(batch, k * q)
    n = k * p
    # y[b, i*q + o] = sum_c x[b, i*p + c] w[i, o, c]
    bmm_strided((x, p, n, 1, 0), (w, q * p, 1, 0, p), (y, q, k * q, 1, 0), k, batch, q, p)
    return y


def _bd_bwd(gy: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    k, q, p = w.shape
    batch = x.shape[0]
    gy, x = gy.contiguous(), x.contiguous()
    dx = x.new_empty(batch, k * p)
    dw = w.new_empty(k, q, p)
    # dx[b, i*p + c] = sum_o gy[b, i*q + o] w[i, o, c]
    bmm_strided((gy, q, k * q, 1, 0), (w, q * p, p, 0, 1), (dx, p, k * p, 1, 0), k, batch, p, q)
    # dw[i, o, c] = sum_b gy[b, i*q + o] x[b, i*p + c]
    bmm_strided((gy, q, 1, k * q, 0), (x, p, k * p, 0, 1), (dw, q * p, p, 1, 0), k, q, p, batch)
    return dx, dw


class _BlockDiagTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _bd_fwd(x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        return _bd_bwd(gy, x, w)


def blockdiag_triton(x: Tensor, weight: Tensor) -> Tensor:
    """``x: (batch, k*p)``, ``weight: (k, q, p)`` -> ``(batch, k*q)``."""
    return _BlockDiagTriton.apply(x, weight)


# ------------------------------------------------------------------------------------------ monarch
def _mo_fwd(x: Tensor, R: Tensor, L: Tensor, r: int) -> tuple[Tensor, Tensor]:
    k, lr, p = R.shape
    l, s, kr = L.shape
    batch = x.shape[0]
    x = x.contiguous()
    n_in = k * p
    # h[j, b, i*r + t] = sum_c x[b, i*p + c] R[i, j*r + t, c]   (batch i, m = b, n = (j, t))
    h = x.new_empty(l, batch, kr)
    bmm_strided((x, p, n_in, 1, 0), (R, lr * p, 1, 0, p), (h, r, kr, batch * kr, 1), k, batch, lr, p, rn=r)
    # y[b, s'*l + j] = sum_{i,t} h[j, b, i*r + t] L[j, s', i*r + t]   (batch j, m = b, n = s')
    y = x.new_empty(batch, s * l)
    bmm_strided((h, batch * kr, kr, 1, 0), (L, s * kr, 1, 0, kr), (y, 1, s * l, l, 0), l, batch, s, kr)
    return y, h


def _mo_bwd(gy: Tensor, x: Tensor, h: Tensor, R: Tensor, L: Tensor, r: int):
    k, lr, p = R.shape
    l, s, kr = L.shape
    batch = x.shape[0]
    gy, x = gy.contiguous(), x.contiguous()
    n_out, n_in = s * l, k * p
    # dL[j, s', c] = sum_b gy[b, s'*l + j] h[j, b, c]
    dL = L.new_empty(l, s, kr)
    bmm_strided((gy, 1, l, n_out, 0), (h, batch * kr, kr, 0, 1), (dL, s * kr, kr, 1, 0), l, s, kr, batch)
    # dh[j, b, c] = sum_s' gy[b, s'*l + j] L[j, s', c]
    dh = h.new_empty(l, batch, kr)
    bmm_strided((gy, 1, n_out, l, 0), (L, s * kr, kr, 0, 1), (dh, batch * kr, kr, 1, 0), l, batch, kr, s)
    # dR[i, j*r + t, c] = sum_b dh[j, b, i*r + t] x[b, i*p + c]   (batch i, m = (j, t), n = c)
    dR = R.new_empty(k, lr, p)
    # m index (j, t) is split: A's m stride can't split, so run one launch per t (r is small)
    for t in range(r):
        bmm_strided((dh[:, :, t:], r, batch * kr, kr, 0), (x, p, n_in, 0, 1),
                    (dR[:, t:, :], lr * p, r * p, 1, 0), k, l, p, batch)
    # dx[b, i*p + c] = sum_{j,t} dh[j, b, i*r + t] R[i, j*r + t, c]   (k index (j, t) split by r)
    dx = x.new_empty(batch, n_in)
    bmm_strided((dh, r, kr, batch * kr, 1), (R, lr * p, r * p, p, 1), (dx, p, n_in, 1, 0), k, batch, p, lr,
                rk=r)
    return dx, dR, dL


class _MonarchTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, L, r):
        y, h = _mo_fwd(x, R, L, r)
        ctx.save_for_backward(x, h, R, L)
        ctx.r = r
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, h, R, L = ctx.saved_tensors
        dx, dR, dL = _mo_bwd(gy, x, h, R, L, ctx.r)
        return dx, dR, dL, None


def monarch_triton(x: Tensor, R: Tensor, L: Tensor, rank: int) -> Tensor:
    """Same contract as :func:`deftly.kernels.monarch.monarch_forward`'s ``y``: ``(batch, s*l)``."""
    return _MonarchTriton.apply(x, R, L, rank)
