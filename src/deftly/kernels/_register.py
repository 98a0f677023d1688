"""The built-in kernels, registered with :mod:`deftly.kernels.dispatch` (imported on first dispatch)."""

from __future__ import annotations

import torch
from torch import Tensor

from .blockdiag import blockdiag_apply
from .butterfly import butterfly_blocked_matmul, split_bits
from .dispatch import register_backend
from .monarch import monarch_apply


def _blockdiag(strided: bool):
    def fn(layer, x: Tensor) -> Tensor:
        y = blockdiag_apply(layer.in_part.pad(x), layer.weight, strided)
        return layer.out_part.unpad(y)
    return fn


def _monarch(layer, x: Tensor) -> Tensor:
    y = monarch_apply(layer.in_part.pad(x), layer.R, layer.L, layer.rank)
    return y[:, :layer.out_features] if y.shape[1] != layer.out_features else y


def _butterfly_flops(layer, batch: int) -> float:
    """Multiply-adds of the two block products per butterfly (x4 for complex), x2."""
    c1 = 1 << split_bits(layer.log_n)
    c2 = layer.n // c1
    return 2.0 * batch * layer.depth * layer.n * (c1 + c2) * (4 if layer.twiddle.is_complex() else 1)


register_backend("blockdiag", "kernel", _blockdiag(False), default=True, plain_only=True)
# bmm writing straight into the strided (batch, k, q) output: CPU torch then loops block by block through
# addmm; measured erratic (from on par to many times slower), so only when forced
register_backend("blockdiag", "kernel_strided", _blockdiag(True), plain_only=True, compile_ok=False, auto=False)
register_backend("monarch", "kernel", _monarch, default=True, plain_only=True)
register_backend("butterfly", "kernel", butterfly_blocked_matmul, flops=_butterfly_flops, plain_only=True,
                 compile_ok=False)



def _triton_ok(x: Tensor) -> bool:
    from . import triton_kernels

    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_kernels.available(x.device)


def _blockdiag_triton(layer, x: Tensor) -> Tensor:
    from .triton_kernels import blockdiag_triton

    return layer.out_part.unpad(blockdiag_triton(layer.in_part.pad(x), layer.weight))


def _monarch_triton(layer, x: Tensor) -> Tensor:
    from .triton_kernels import monarch_triton

    y = monarch_triton(layer.in_part.pad(x), layer.R, layer.L, layer.rank)
    return y[:, :layer.out_features] if y.shape[1] != layer.out_features else y


register_backend("blockdiag", "triton", _blockdiag_triton, available=_triton_ok, plain_only=True,
                 compile_ok=False)
register_backend("monarch", "triton", _monarch_triton, available=_triton_ok, plain_only=True, compile_ok=False)
