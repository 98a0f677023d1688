"""Plain matrix products with the bias fused: the dense structure and the low-rank factorisation.

Both are a few BLAS calls whatever the batch; what these save over the structures' own ``_matmul`` plus
a bias add is the separate add (one op, ~2 us at batch 1): ``F.linear(x, W, b)`` and ``addmm``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["linear_matmul", "lowrank_matmul"]


def linear_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` in one call (``weight: (out, in)``)."""
    if bias is not None and bias.dtype != weight.dtype:
        return F.linear(x, weight) + bias
    return F.linear(x, weight, bias)


def lowrank_matmul(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x @ V.T) @ U.T + bias`` (``V: (rank, in)``, ``U: (out, rank)``), the bias fused by ``addmm``."""
    h = torch.mm(x, V.t())  # (batch, rank)
    if bias is None:
        return torch.mm(h, U.t())
    if bias.dtype != h.dtype:
        return torch.mm(h, U.t()) + bias
    return torch.addmm(bias, h, U.t())
