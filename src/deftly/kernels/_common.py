"""Small helpers shared by the kernels: padding through a gather index, the gradient test, Triton's
availability (without importing Triton)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["needs_grad", "pad_cols", "triton_usable"]


def pad_cols(x: Tensor, index: Tensor | None) -> Tensor:
    """``x (batch, n)`` gathered through ``index`` from ``[x, 0]`` (``index == n``: a zero slot); ``x``
    itself when ``index`` is None."""
    if index is None:
        return x
    return F.pad(x, (0, 1)).index_select(1, index)


def needs_grad(*tensors: Tensor) -> bool:
    """Autograd will record this op: gradients on and some operand requires them."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return True
    return False


def triton_usable(x: Tensor) -> bool:
    """A dtype the Triton kernels support, on a device they run on (CUDA, or the interpreter)."""
    from .triton_kernels import available

    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and available(x.device)
