"""Monarch multiply (two batched matmuls) with a copy-avoiding layout and a hand-written backward.

Shapes follow :mod:`deftly.layers.monarch`: ``x: (batch, k*p)`` (padded input), ``R: (k, l*r, p)``,
``L: (l, s, k*r)``; output index ``s'*l + j`` (``y: (batch, s*l)``).

Layout. The intermediate ``h`` lives with the batch axis *fastest*: ``hT = R_i @ x_i^T`` is a ``bmm``
whose right operand is ``x`` read in place (``x_i^T`` has strides ``(1, k*p)``: a transposed BLAS
operand), and whose output ``(k, l*r, batch)`` is contiguous. For ``r = 1`` the permutation ``P`` is
then free: the second ``bmm`` reads ``hT`` as ``(l, batch, k)`` with strides ``(batch, 1, l*batch)`` --
a transposed BLAS operand again, no copy (``r > 1`` needs one copy that keeps the batch axis fastest).
The second ``bmm`` writes ``(l, batch, s)`` contiguously and the output permutation ``P^T`` is one 2-D
transpose ``(l, batch*s) -> (batch*s, l)``, which is exactly ``y`` in row-major order.

Backward: ``gy`` is transposed once into ``(l, batch, s)``; ``dL``, ``dh``, ``dR`` and ``dx`` are four
``bmm``s. Two transposes in all (the unavoidable ones: the output index puts the block index ``j``
fastest), against four for the textbook layout; one more copy (rows of ``p`` values, memory speed)
hands MKL contiguous blocks of ``x`` for ``dR`` (see :func:`monarch_backward`). The small
weights are passed pre-transposed where ``bmm`` would otherwise read them transposed. Every large
buffer comes from :mod:`deftly.kernels._pool`; the 2-D transposes use :mod:`deftly.kernels._transpose`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _pool
from ._common import needs_grad, pad_cols
from ._transpose import cached_transpose, pretransposed, transpose_into

__all__ = ["MonarchFunction", "monarch_apply", "monarch_backward", "monarch_forward", "monarch_matmul",
           "monarch_matmul_triton", "monarch_native"]

#: at most this many rows take the plain two-bmm forward when no gradient is needed (no buffer pool, no
#: autograd.Function: at batch 1 the op count is the cost)
SMALL_BATCH = 16
#: below this many rows ``dL`` is written in its final ``(l, s, k*r)`` layout by the ``bmm`` itself (at
#: batch 1 the weight gradient's copy is a third of the backward: 1.42x faster fwd+bwd at n = 4096, 1.07x
#: at 64); from here the ``(l, k*r, s)`` product and one copy measured faster (0.96x at 2048)
DIRECT_DL_BATCH = 1024



def _rows_to_blocks(x: Tensor, k: int, p: int) -> Tensor:
    """``x (batch, k*p)`` as a contiguous ``(k, batch, p)`` copy (rows of ``p`` values: memory speed)."""
    batch = x.shape[0]
    out = _pool.empty((k, batch, p), x.dtype, x.device)
    out.copy_(x.reshape(batch, k, p).transpose(0, 1))
    return out


def monarch_forward(x: Tensor, R: Tensor, L: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Returns ``y (batch, s*l)`` and the saved intermediate ``hT (k, l*r, batch)`` (batch fastest)."""
    k, lr, p = R.shape
    l, s, kr = L.shape
    r = rank
    batch = x.shape[0]
    dt, dev = x.dtype, x.device
    xv = x.view(batch, k, p) if x.is_contiguous() else x.reshape(batch, k, p)
    hT = _pool.empty((k, lr, batch), dt, dev)
    torch.bmm(R, xv.permute(1, 2, 0), out=hT)  # (k, l*r, batch)
    if r == 1:
        h = hT.transpose(0, 1)  # (l, k, batch): strides (batch, l*batch, 1), no copy
    else:
        h = _pool.empty((l, kr, batch), dt, dev)
        h.view(l, k, r, batch).copy_(hT.view(k, l, r, batch).permute(1, 0, 2, 3))
    yl = _pool.empty((l, batch, s), dt, dev)
    torch.bmm(h.transpose(1, 2), pretransposed(L, x), out=yl)  # (l, batch, s)
    del h
    y = _pool.empty((batch, s * l), dt, dev)
    transpose_into(yl.view(l, batch * s), y.view(batch * s, l))  # P^T
    return y, hT


def monarch_backward(gy: Tensor, x: Tensor, hT: Tensor, R: Tensor, L: Tensor, rank: int,
                     need_x: bool = True, need_r: bool = True, need_l: bool = True
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients from the saved ``x`` (padded input) and ``hT (k, l*r, batch)``.

    Layout choices measured on the 2-core machine (n = 4096, batch 2048, one thread): ``dR = d_i x_i``
    on the strided view of ``x`` (rows 16 KB apart) runs at half speed, so ``x`` is first copied into
    contiguous ``(k, batch, p)`` blocks (rows of ``p`` values, memory speed, cheaper than what it saves);
    for ``h`` and ``d`` (rows ``batch`` values long) the strided views are as fast as copies, so
    ``r = 1`` copies nothing else. At most two batch-by-n temporaries are alive at any point (buffers go
    back to the pool as soon as they are dropped).
    """
    k, lr, p = R.shape
    l, s, kr = L.shape
    r = rank
    batch = x.shape[0]
    dt, dev = gy.dtype, gy.device
    g = _pool.empty((l, batch, s), dt, dev)
    if gy.is_contiguous():
        transpose_into(gy.view(batch * s, l), g.view(l, batch * s))
    else:
        g.copy_(gy.reshape(batch, s, l).permute(2, 0, 1))
    dx = dR = dL = None
    if need_l:
        if r == 1:
            h = hT.transpose(0, 1)  # (l, k, batch) view: as fast as a contiguous copy here
        else:  # [j][i, t][b]: (i, t) must be one axis
            h = _pool.empty((l, kr, batch), dt, dev)
            h.view(l, k, r, batch).copy_(hT.view(k, l, r, batch).permute(1, 0, 2, 3))
        if batch < DIRECT_DL_BATCH:
            dL = torch.bmm(g.transpose(1, 2), h.transpose(1, 2))  # (l, s, batch) @ (l, batch, k*r)
        else:
            dL = torch.bmm(h, g).transpose(1, 2).contiguous()  # (l, k*r, s) -> (l, s, k*r)
        del h
    if need_x or need_r:
        dh = _pool.empty((l, kr, batch), dt, dev)
        torch.bmm(pretransposed(L, gy), g.transpose(1, 2), out=dh)  # (l, k*r, batch)
        del g
        if r == 1:
            d = dh.transpose(0, 1)  # (k, l, batch) view
        else:
            d = _pool.empty((k, lr, batch), dt, dev)  # [i][j, t][b]
            d.view(k, l, r, batch).copy_(dh.view(l, k, r, batch).permute(1, 0, 2, 3))
            del dh
        if need_r:
            xc = _rows_to_blocks(x, k, p)  # strided x would make this bmm 2x slower than the copy costs
            dR = torch.bmm(d, xc)  # (k, l*r, batch) @ (k, batch, p)
            del xc
        if need_x:
            dxk = _pool.empty((k, batch, p), dt, dev)
            torch.bmm(d.transpose(1, 2), R, out=dxk)  # (k, batch, l*r) @ (k, l*r, p)
            del d
            dx = _pool.empty((batch, k * p), dt, dev)
            dx.view(batch, k, p).copy_(dxk.transpose(0, 1))
    return dx, dR, dL


class MonarchFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`monarch_forward` / :func:`monarch_backward` (first order only)."""

    @staticmethod
    def forward(ctx, x: Tensor, R: Tensor, L: Tensor, rank: int) -> Tensor:
        y, h = monarch_forward(x, R, L, rank)
        ctx.save_for_backward(x, h, R, L)
        ctx.rank = rank
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, h, R, L = ctx.saved_tensors
        nx, nr, nl = ctx.needs_input_grad[:3]
        dx, dR, dL = monarch_backward(gy, x, h, R, L, ctx.rank, nx, nr, nl)
        return dx, dR, dL, None


# ---------------------------------------------------------------- custom op (for torch.compile)
@torch.library.custom_op("deftly::monarch_fwd", mutates_args=())
def _monarch_op(x: Tensor, R: Tensor, L: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    return monarch_forward(x.contiguous(), R, L, rank)


@_monarch_op.register_fake
def _(x, R, L, rank):
    k, lr, _p = R.shape
    l, s, _kr = L.shape
    batch = x.shape[0]
    return x.new_empty(batch, s * l), x.new_empty(k, lr, batch)


@torch.library.custom_op("deftly::monarch_bwd", mutates_args=())
def _monarch_bwd_op(gy: Tensor, x: Tensor, h: Tensor, R: Tensor, L: Tensor, rank: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    dx, dR, dL = monarch_backward(gy.contiguous(), x.contiguous(), h, R, L, rank)
    assert dx is not None and dR is not None and dL is not None  # all three requested (the defaults)
    return dx, dR, dL


@_monarch_bwd_op.register_fake
def _(gy, x, h, R, L, rank):
    return x.new_empty(x.shape), R.new_empty(R.shape), L.new_empty(L.shape)


def _setup(ctx, inputs, output):
    x, R, L, rank = inputs
    ctx.save_for_backward(x, output[1], R, L)
    ctx.rank = rank


def _backward(ctx, gy, gh):
    x, h, R, L = ctx.saved_tensors
    dx, dR, dL = _monarch_bwd_op(gy, x, h, R, L, ctx.rank)
    return dx, dR, dL, None


_monarch_op.register_autograd(_backward, setup_context=_setup)


def monarch_native(x: Tensor, R: Tensor, L: Tensor, rank: int) -> Tensor:
    """Plain autograd version with the same layout (any dtype, autocast, double backward, functorch)."""
    k, _lr, p = R.shape
    l, s, kr = L.shape
    batch = x.shape[0]
    hT = torch.matmul(R, x.reshape(batch, k, p).permute(1, 2, 0))  # (k, l*r, batch)
    h = hT.reshape(k, l, rank, batch).permute(1, 0, 2, 3).reshape(l, kr, batch)
    yl = torch.bmm(h.transpose(1, 2), L.transpose(1, 2))  # (l, batch, s)
    return yl.permute(1, 2, 0).reshape(batch, s * l)


def monarch_apply(x: Tensor, R: Tensor, L: Tensor, rank: int) -> Tensor:
    """The fast path: custom op under ``torch.compile``, the pooled autograd function in eager mode."""
    if torch.compiler.is_compiling():
        return _monarch_op(x, R, L, rank)[0]
    return MonarchFunction.apply(x, R, L, rank)


def _small_forward(x: Tensor, R: Tensor, L: Tensor, rank: int, out_features: int, bias: Tensor | None
                   ) -> Tensor:
    """Two ``bmm``'s, the output permutation fused with the bias add (no gradient, few rows)."""
    k, _lr, p = R.shape
    l, s, kr = L.shape
    batch = x.shape[0]
    h = torch.bmm(x.reshape(batch, k, p).transpose(0, 1), cached_transpose(R))  # (k, batch, l*r)
    # a copy: for r = 1 the reshape is a view without unit-stride rows, which CPU bmm loops over
    h = h.view(k, batch, l, rank).permute(2, 1, 0, 3).reshape(l, batch, kr).contiguous()
    yv = torch.bmm(h, cached_transpose(L)).permute(1, 2, 0)  # (batch, s, l): index s'*l + j
    if s * l == out_features and bias is not None and bias.dtype == yv.dtype:
        return torch.add(bias.view(s, l), yv).reshape(batch, out_features)  # bias first: contiguous out
    y = yv.reshape(batch, s * l)
    if s * l != out_features:
        y = y[:, :out_features]
    return y if bias is None else y + bias


def monarch_matmul(x: Tensor, R: Tensor, L: Tensor, rank: int, out_features: int, in_index: Tensor | None,
                   bias: Tensor | None = None) -> Tensor:
    """The Monarch layer's multiply ``(batch, in) -> (batch, out)`` (+ ``bias``).

    ``in_index``: the partition's gather index when the blocks pad the input (None when they do not).
    Under ``torch.compile``: the custom op; with a gradient needed: :class:`MonarchFunction` (hand-written
    backward); otherwise the forward alone (two ``bmm``'s on views for a few rows, the pooled
    copy-avoiding layout for more).
    """
    x = pad_cols(x, in_index)
    if torch.compiler.is_compiling():
        y = _monarch_op(x, R, L, rank)[0]
    elif needs_grad(x, R, L):
        y = MonarchFunction.apply(x, R, L, rank)
    elif x.shape[0] <= SMALL_BATCH:
        return _small_forward(x, R, L, rank, out_features, bias)
    else:
        y = monarch_forward(x, R, L, rank)[0]  # a fresh buffer: the bias may be added in place
        if y.shape[1] != out_features:
            y = y[:, :out_features]
        if bias is None:
            return y
        return y.add_(bias) if bias.dtype == y.dtype else y + bias
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    return y if bias is None else y + bias


def monarch_matmul_triton(x: Tensor, R: Tensor, L: Tensor, rank: int, out_features: int,
                          in_index: Tensor | None) -> Tensor:
    """:func:`monarch_matmul` through the Triton kernels (CUDA, or the interpreter)."""
    from .triton_kernels import monarch_triton

    y = monarch_triton(pad_cols(x, in_index), R, L, rank)
    return y[:, :out_features] if y.shape[1] != out_features else y
