"""Blocked butterfly: the ``log2 n`` radix-2 factors of each butterfly as two batched matmuls.

The layer (:mod:`deftly.layers.butterfly`) stores ``twiddle: (depth, k, n/2, 2, 2)``; factor ``j`` has
stride ``2**j`` and pairs positions ``p`` and ``p + 2**j``. Split the position bits into a low group
(bits ``0 .. k1-1``, ``C1 = 2**k1`` values) and a high group (``C2 = n / C1``): ``pos = c2*C1 + c1``.
Every factor of the low group acts only on ``c1`` (a different ``C1 x C1`` matrix for each ``c2``), every
factor of the high group only on ``c2``. So a butterfly (strides ``1 .. n/2``, or ``n/2 .. 1`` for odd
``d``) is two block-diagonal products: ``M_lo: (C2, C1, C1)`` and ``M_hi: (C1, C2, C2)``, each one ``bmm``
over the batch instead of ``k`` elementwise passes (``k1 = ceil(k/2)``: 64x64 blocks at ``n = 4096``).
The exact FFT costs more multiply-adds this way (``n (C1 + C2)`` per row against ``2 n k``), but they run
at matmul speed.

Building ``M_lo``/``M_hi`` from the twiddles is itself the radix-2 product applied to ``C1`` (``C2``)
indicator columns, differentiable, so training needs no
hand-written backward. With gradients off the blocks are cached per twiddle tensor and version.

Contract with :mod:`deftly.layers.butterfly` (the kernel takes tensors and sizes, never the layer):
``twiddle (depth, log n, n/2, 2, 2)``, factor ``j`` of butterfly ``d`` has stride ``2**j`` and the
factors of butterfly ``d`` apply in increasing stride order for even ``d``, decreasing for odd ``d``;
the input is zero-padded to ``n`` and, unless ``perm == "none"``, gathered through ``gather_index``
from ``[x, 0]``.

State layout: the batch axis is kept fastest between the two ``bmm``s (each reads the previous output
as a strided BLAS operand, no copy); the last ``bmm`` of the last butterfly writes batch-major and one
copy (a 2-D transpose when the last group is the high one) gives the ``(batch, n)`` result.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["butterfly_blocks", "butterfly_flops", "butterfly_matmul", "clear_cache", "split_bits"]

# id(twiddle) -> (weak reference to it, version key, blocks)
_CACHE: dict[int, tuple] = {}


def split_bits(log_n: int) -> int:
    """Number of low bits ``k1`` (``C1 = 2**k1``)."""
    return (log_n + 1) // 2


def butterfly_flops(n: int, depth: int, complex_: bool, batch: int) -> float:
    """FLOPs of :func:`butterfly_matmul`: the two block products per butterfly, x4 for complex."""
    log_n = n.bit_length() - 1
    c1 = 1 << split_bits(log_n)
    c2 = n // c1
    return 2.0 * batch * depth * n * (c1 + c2) * (4 if complex_ else 1)


def _strides(d: int, log_n: int) -> list[int]:
    """Factor indices ``j`` (stride ``2**j``) of butterfly ``d`` in the order they are applied."""
    order = list(range(log_n))
    return order if d % 2 == 0 else order[::-1]


def _stage(h: Tensor, tw: Tensor, stride: int) -> Tensor:
    """One radix-2 factor on batch-last data ``h (n, m)``; ``tw (n/2, 2, 2)``, block ``g*stride + t``."""
    n, m = h.shape
    g = n // (2 * stride)
    hv = h.view(g, 2, stride, m)
    a = tw.reshape(g, stride, 2, 2).unsqueeze(-1)  # (g, s, 2[out], 2[in], 1)
    x0, x1 = hv[:, 0], hv[:, 1]  # (g, s, m)
    y0 = a[:, :, 0, 0] * x0 + a[:, :, 0, 1] * x1
    y1 = a[:, :, 1, 0] * x0 + a[:, :, 1, 1] * x1
    return torch.stack([y0, y1], dim=1).view(n, m)


def _group_blocks(tw: Tensor, strides: list[int], n: int, low: bool, k1: int) -> Tensor:
    """Blocks of the factors ``strides`` (applied in this order) of one butterfly (``tw: (k, n/2, 2, 2)``).

    ``low``: ``(C2, C1, C1)`` with ``M[c2][c1_out, c1_in]``; else ``(C1, C2, C2)`` with ``M[c1][c2_out, c2_in]``.
    """
    C1 = 1 << k1
    C2 = n // C1
    if low:
        e = torch.eye(C1, dtype=tw.dtype, device=tw.device).repeat(C2, 1)  # e[pos, m] = (c1 == m)
    else:
        e = torch.eye(C2, dtype=tw.dtype, device=tw.device).repeat_interleave(C1, dim=0)  # (c2 == m)
    for j in strides:
        e = _stage(e, tw[j], 1 << j)
    if low:
        return e.view(C2, C1, C1)  # (c2, c1_out, m)
    return e.view(C2, C1, C2).transpose(0, 1)  # (c1, c2_out, m)


def _steps(depth: int, log_n: int) -> list[tuple[int, bool, list[int]]]:
    """``(d, low, strides)`` for every group, in application order."""
    k1 = split_bits(log_n)
    out = []
    for d in range(depth):
        order = _strides(d, log_n)
        lo = [j for j in order if j < k1]
        hi = [j for j in order if j >= k1]
        groups = [(True, lo), (False, hi)] if (order and order[0] < k1) else [(False, hi), (True, lo)]
        out += [(d, low, js) for low, js in groups if js]
    return out


def _folds_bitrev(perm: str, log_n: int) -> bool:
    """The bit-reversal input permutation is folded into the blocks (the exact FFT's ``perm="bitrev"``)
    when the first group of the first butterfly is the low one (always, for strides 1, 2, ...)."""
    return perm == "bitrev" and log_n >= 2


def _drop(ref: weakref.ref, key: int) -> None:
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is ref:
        del _CACHE[key]


def clear_cache() -> None:
    """Forget every cached set of blocks."""
    _CACHE.clear()


def butterfly_blocks(twiddle: Tensor, perm: str = "none") -> list[tuple[bool, Tensor]]:
    """``[(low, blocks), ...]`` for every group in application order; cached when gradients are off."""
    depth, log_n = twiddle.shape[0], twiddle.shape[1]
    n = 2 * twiddle.shape[2]
    cacheable = not (torch.is_grad_enabled() and twiddle.requires_grad)
    if cacheable:
        try:
            key = (twiddle._version, twiddle.data_ptr(), twiddle.dtype, twiddle.device, perm)
        except RuntimeError:  # inference tensors have no version counter
            cacheable = False
    if cacheable:
        hit = _CACHE.get(id(twiddle))
        if hit is not None and hit[0]() is twiddle and hit[1] == key:
            return hit[2]
    k1 = split_bits(log_n)
    blocks = [(low, _group_blocks(twiddle[d], js, n, low, k1)) for d, low, js in _steps(depth, log_n)]
    if _folds_bitrev(perm, log_n):
        blocks = _fold_bitrev(blocks, k1, log_n - k1)
    if cacheable:
        tid = id(twiddle)
        _CACHE[tid] = (weakref.ref(twiddle, functools.partial(_drop, key=tid)), key, blocks)
    return blocks


def butterfly_matmul(x: Tensor, twiddle: Tensor, gather_index: Tensor | None, in_features: int,
                     out_features: int, perm: str, real_output: bool) -> Tensor:
    """The butterfly layer's multiply ``(batch, in) -> (batch, out)`` (see the module doc's contract)."""
    log_n = twiddle.shape[1]
    n = 2 * twiddle.shape[2]
    if _folds_bitrev(perm, log_n):
        h = _prepare_bitrev(x, twiddle.dtype, in_features, n, log_n)
    else:
        h = _prepare(x, twiddle.dtype, gather_index, in_features, n, perm)  # (batch, n)
    batch = h.shape[0]
    k1 = split_bits(log_n)
    C1, C2 = 1 << k1, n // (1 << k1)
    blocks = butterfly_blocks(twiddle, perm)
    # the state as a view with axes (c2, c1, batch), whatever its storage order
    state = h.view(batch, C2, C1).permute(1, 2, 0)
    last = len(blocks) - 1
    y = None
    for i, (low, M) in enumerate(blocks):
        # bmm over the untouched axis: low -> batch c2, matrices over c1; high -> batch c1, over c2
        s = state if low else state.transpose(0, 1)  # (batch axis, acted axis, batch rows)
        if i < last:
            out = torch.bmm(M, s)  # (outer, acted, batch), batch fastest
            state = out if low else out.transpose(0, 1)
        else:
            out = torch.bmm(s.transpose(1, 2), M.transpose(1, 2))  # (outer, batch, acted)
            if low:  # (c2, batch, c1) -> (batch, c2, c1): rows of C1 values
                y = out.transpose(0, 1).reshape(batch, n)
            else:  # (c1, batch, c2) -> (batch, c2, c1): one 2-D transpose (c1, batch*c2)^T
                y = _Transpose2D.apply(out.view(C1, batch * C2)).view(batch, n)
    if y is None:  # no factors (n = 1 cannot happen: n >= 2), kept for safety
        y = h
    y = y[:, :out_features]
    return y.real if real_output else y


class _Transpose2D(torch.autograd.Function):
    """``src.t().contiguous()`` whose backward also returns a *contiguous* gradient: a transposed view
    would reach ``bmm``'s backward with strides no BLAS call accepts (CPU torch then falls back to a
    loop that is two orders of magnitude slower)."""

    @staticmethod
    def forward(ctx, src: Tensor) -> Tensor:
        return src.t().contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g.t().contiguous()


def _bitrev(m: int) -> Tensor:
    """``(m,)``: ``i`` with its ``log2 m`` bits reversed."""
    k = m.bit_length() - 1
    idx = torch.arange(m)
    rev = torch.zeros(m, dtype=torch.long)
    for b in range(k):
        rev |= ((idx >> b) & 1) << (k - 1 - b)
    return rev


def _fold_bitrev(blocks: list, k1: int, k2: int) -> list:
    """Bit reversal of ``pos = c2*C1 + c1`` reads input ``rev_k1(c1) * C2 + rev_k2(c2)``: a transpose of
    the ``(C1, C2)`` tile of each input row (:func:`_prepare_bitrev`, fused with the cast) plus a
    reversal of each axis, which relabels the first block product's batch order and columns and the
    second one's columns (rev is an involution)."""
    r1 = _bitrev(1 << k1).to(blocks[0][1].device)
    r2 = _bitrev(1 << k2).to(blocks[0][1].device)
    out = list(blocks)
    low, M = out[0]
    assert low
    out[0] = (True, M.index_select(0, r2).index_select(2, r1))  # (c, c1_out, a)
    if len(out) > 1:
        low2, M2 = out[1]
        assert not low2
        out[1] = (False, M2.index_select(2, r2))  # columns indexed by c = rev(c2)
    return out


def _prepare_bitrev(x: Tensor, dtype: torch.dtype, in_features: int, n: int, log_n: int) -> Tensor:
    """Zero-padded input with each row's ``(C1, C2)`` tile transposed, in the twiddle dtype: one copy
    (the folded equivalent of the bit-reversal gather plus the cast)."""
    if in_features != n:
        x = F.pad(x, (0, n - in_features))
    batch = x.shape[0]
    k1 = split_bits(log_n)
    C1, C2 = 1 << k1, n >> k1
    out = torch.empty(batch, C2, C1, dtype=dtype, device=x.device)
    out.copy_(x.reshape(batch, C1, C2).transpose(1, 2))
    return out.view(batch, n)


def _prepare(x: Tensor, dtype: torch.dtype, gather_index: Tensor | None, in_features: int, n: int,
             perm: str) -> Tensor:
    """Zero-pad to ``n``, apply the fixed input permutation, cast to the twiddle dtype (gather before the
    cast: on a real input it moves half the bytes)."""
    if perm != "none":  # gather from [x, 0]: padding slots read the appended zero column
        src = x if in_features == n else F.pad(x, (0, 1))
        assert gather_index is not None  # layers pass one whenever perm != 'none'
        x = src.index_select(1, gather_index)
    elif in_features != n:
        x = F.pad(x, (0, n - in_features))
    return x.to(dtype)
