"""Block-diagonal multiply ``y = blockdiag(W) x`` as one batched matmul, with a hand-written backward.

Layout (``x: (batch, k*p)``, ``W: (k, q, p)``, ``y: (batch, k*q)``):

* forward: ``bmm`` reads ``x`` in place through the strided view ``(k, batch, p)`` (row stride ``k*p``:
  a valid BLAS layout, no copy) and writes a contiguous ``(k, batch, q)``; one copy of rows of ``q``
  values brings it to ``(batch, k, q)`` (the fast axis stays put, so it runs at memory speed);
* backward: ``gy`` and ``x`` are copied into contiguous ``(k, batch, *)`` blocks (rows of ``q``/``p``
  values), on which ``dW = g_i^T x_i`` runs ~2x faster than on the strided views; ``dx`` is one ``bmm``
  plus the same row copy.

Every large buffer comes from :mod:`deftly.kernels._pool`, so steady-state training allocates nothing
new (fresh 32 MB buffers cost ~9 ms of page faults each with glibc). ``out_mode="strided"`` lets
``bmm`` write straight into the ``(batch, k, q)`` output instead (CPU torch then loops block by block:
good for large batches, bad for small ones; the dispatcher measures both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _pool
from ._common import needs_grad, pad_cols
from ._transpose import cached_transpose, pretransposed

__all__ = [
    "BlockDiagFunction",
    "blockdiag_apply",
    "blockdiag_backward",
    "blockdiag_forward",
    "blockdiag_matmul",
    "blockdiag_matmul_strided",
    "blockdiag_matmul_triton",
    "blockdiag_native",
]

#: at most this many rows take the plain ``bmm`` forward when no gradient is needed
SMALL_BATCH = 64


def _bmm_to_rows(a: Tensor, b: Tensor, batch: int, strided: bool) -> Tensor:
    """``bmm(a, b)`` with ``a: (k, batch, m)``, ``b: (k, m, q)``, returned as ``(batch, k*q)``."""
    k, q = b.shape[0], b.shape[2]
    out = _pool.empty((batch, k * q), a.dtype, a.device)
    if strided:
        torch.bmm(a, b, out=out.view(batch, k, q).transpose(0, 1))
    else:
        tmp = _pool.empty((k, batch, q), a.dtype, a.device)
        torch.bmm(a, b, out=tmp)
        out.view(batch, k, q).copy_(tmp.transpose(0, 1))
    return out



def _blocks(x: Tensor, k: int, p: int) -> Tensor:
    """``x (batch, k*p)`` as a contiguous ``(k, batch, p)`` copy (rows of ``p`` values: memory speed)."""
    batch = x.shape[0]
    out = _pool.empty((k, batch, p), x.dtype, x.device)
    out.copy_(x.reshape(batch, k, p).transpose(0, 1))
    return out


def blockdiag_forward(x: Tensor, weight: Tensor, strided: bool = False) -> Tensor:
    """``x: (batch, k*p)``, ``weight: (k, q, p)`` -> ``(batch, k*q)`` (contiguous)."""
    k, _q, p = weight.shape
    batch = x.shape[0]
    xb = x.view(batch, k, p).transpose(0, 1) if x.is_contiguous() else x.reshape(batch, k, p).transpose(0, 1)
    return _bmm_to_rows(xb, pretransposed(weight, x), batch, strided)


def blockdiag_backward(gy: Tensor, x: Tensor, weight: Tensor, need_x: bool = True, need_w: bool = True,
                       strided: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """``dW = g_i^T x_i`` contracts over the batch: MKL runs it ~2x faster on contiguous ``(k, batch, *)``
    blocks than on views whose rows are ``k*p`` apart (16 KB at n = 4096), so ``gy`` and ``x`` are copied
    block by block first (rows of ``q``/``p`` values, memory speed)."""
    k, q, p = weight.shape
    batch = x.shape[0]
    dx = dw = None
    if need_w:
        g = _blocks(gy, k, q)
        xc = _blocks(x, k, p)
        dw = torch.bmm(g.transpose(1, 2), xc)  # (k, q, batch) @ (k, batch, p)
        del xc
    else:
        g = gy.reshape(batch, k, q).transpose(0, 1)  # (k, batch, q), a view when gy is contiguous
    if need_x:
        dx = _bmm_to_rows(g, weight, batch, strided)  # (batch, k*p)
    return dx, dw


class BlockDiagFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`blockdiag_forward` / :func:`blockdiag_backward` (first order only)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, strided: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.strided = strided
        return blockdiag_forward(x, weight, strided)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = blockdiag_backward(gy, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                    ctx.strided)
        return dx, dw, None


# ---------------------------------------------------------------- custom op (for torch.compile)
@torch.library.custom_op("deftly::blockdiag", mutates_args=())
def _blockdiag_op(x: Tensor, weight: Tensor) -> Tensor:
    return blockdiag_forward(x.contiguous(), weight)


@_blockdiag_op.register_fake
def _(x, weight):
    k, q, _p = weight.shape
    return x.new_empty(x.shape[0], k * q)


@torch.library.custom_op("deftly::blockdiag_backward", mutates_args=())
def _blockdiag_bwd_op(gy: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw = blockdiag_backward(gy.contiguous(), x.contiguous(), weight)
    assert dx is not None and dw is not None  # both requested (the defaults)
    return dx, dw


@_blockdiag_bwd_op.register_fake
def _(gy, x, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, gy):
    x, weight = ctx.saved_tensors
    dx, dw = _blockdiag_bwd_op(gy, x, weight)
    return dx, dw


_blockdiag_op.register_autograd(_backward, setup_context=_setup)


def blockdiag_native(x: Tensor, weight: Tensor) -> Tensor:
    """Plain autograd version (any dtype, autocast, double backward, functorch)."""
    k, q, p = weight.shape
    xb = x.reshape(-1, k, p).transpose(0, 1)
    return torch.bmm(xb, weight.transpose(1, 2)).transpose(0, 1).reshape(-1, k * q)


def blockdiag_apply(x: Tensor, weight: Tensor, strided: bool = False) -> Tensor:
    """The fast path: custom op under ``torch.compile``, the pooled autograd function in eager mode."""
    if torch.compiler.is_compiling():
        return _blockdiag_op(x, weight)
    return BlockDiagFunction.apply(x, weight, strided)


def _small_forward(x: Tensor, weight: Tensor, out_index: Tensor | None, bias: Tensor | None) -> Tensor:
    """One ``bmm`` on the strided view, the bias added in the same op (``baddbmm`` at batch 1, where the
    ``(k, 1, q)`` result already is the ``(1, k*q)`` output) or fused with the layout copy."""
    k, q, p = weight.shape
    batch = x.shape[0]
    xb = x.reshape(batch, k, p).transpose(0, 1)  # (k, batch, p)
    fuse = bias is not None and out_index is None and bias.dtype == x.dtype
    if fuse and bias is not None and batch == 1:  # (fuse implies a bias; named for mypy)
        return torch.baddbmm(bias.view(k, 1, q), xb, cached_transpose(weight)).view(1, k * q)
    yv = torch.bmm(xb, cached_transpose(weight)).transpose(0, 1)  # (batch, k, q)
    if fuse and bias is not None:
        return torch.add(bias.view(k, q), yv).reshape(batch, k * q)  # bias first: contiguous out
    y = yv.reshape(batch, k * q)
    if out_index is not None:
        y = y.index_select(1, out_index)
    return y if bias is None else y + bias


def blockdiag_matmul(x: Tensor, weight: Tensor, in_index: Tensor | None, out_index: Tensor | None,
                     bias: Tensor | None = None, strided: bool = False) -> Tensor:
    """The block-diagonal layer's multiply ``(batch, in) -> (batch, out)`` (+ ``bias``).

    ``in_index`` / ``out_index``: the partitions' gather / real indices when the blocks pad (None when
    they do not). Under ``torch.compile``: the custom op; with a gradient needed: :class:`BlockDiagFunction`
    (pooled, hand-written backward); otherwise the forward alone (one ``bmm`` on the strided view for a few
    rows, the pooled layout for more).
    """
    x = pad_cols(x, in_index)
    if torch.compiler.is_compiling():
        y = _blockdiag_op(x, weight)
    elif needs_grad(x, weight):
        y = BlockDiagFunction.apply(x, weight, strided)
    elif x.shape[0] <= SMALL_BATCH and not strided:
        return _small_forward(x, weight, out_index, bias)
    else:
        y = blockdiag_forward(x, weight, strided)  # a fresh buffer: the bias may be added in place
        if out_index is not None:
            y = y.index_select(1, out_index)
        if bias is None:
            return y
        return y.add_(bias) if bias.dtype == y.dtype else y + bias
    if out_index is not None:
        y = y.index_select(1, out_index)
    return y if bias is None else y + bias


def blockdiag_matmul_strided(x: Tensor, weight: Tensor, in_index: Tensor | None, out_index: Tensor | None,
                             bias: Tensor | None = None) -> Tensor:
    """:func:`blockdiag_matmul` with ``bmm`` writing straight into the strided output (CPU torch then
    loops block by block: measured erratic, so only when forced)."""
    return blockdiag_matmul(x, weight, in_index, out_index, bias, strided=True)


def blockdiag_matmul_triton(x: Tensor, weight: Tensor, in_index: Tensor | None, out_index: Tensor | None
                            ) -> Tensor:
    """:func:`blockdiag_matmul` through the Triton kernels (CUDA, or the interpreter)."""
    from .triton_kernels import blockdiag_triton

    y = blockdiag_triton(pad_cols(x, in_index), weight)
    return y if out_index is None else y.index_select(1, out_index)
