"""Out-of-place 2-D transpose ``out (n, m) <- src (m, n)^T`` for large CPU tensors.

ATen's copy of a transposed 2-D tensor is a scalar, single-threaded blocked loop (~5-6 GB/s here);
Inductor generates a vectorised (16x16 register tiles), OpenMP-parallel kernel for the same copy. The
compiled kernel (``dynamic=True``: one compile for every shape, cached on disk by Inductor) is used for
tensors of at least :data:`MIN_NUMEL` elements; anything that fails (no C++ compiler, ...) falls back to
ATen for the rest of the process. ``DEFTLY_NO_INDUCTOR=1`` disables it.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

__all__ = ["transpose_into", "pretransposed", "MIN_NUMEL"]

MIN_NUMEL = 1 << 20
_STATE: dict = {"fn": None, "off": os.environ.get("DEFTLY_NO_INDUCTOR") == "1"}


def _copy_t(src: Tensor, out: Tensor) -> Tensor:
    out.copy_(src.t())
    return out


def transpose_into(src: Tensor, out: Tensor) -> Tensor:
    """``out (n, m) <- src (m, n)^T``; ``src`` and ``out`` contiguous."""
    if (not _STATE["off"] and src.numel() >= MIN_NUMEL and src.device.type == "cpu"
            and not torch.compiler.is_compiling() and not torch.is_grad_enabled()):
        fn = _STATE["fn"]
        if fn is None:
            fn = _STATE["fn"] = torch.compile(_copy_t, dynamic=True, fullgraph=True)
        try:
            fn(src, out)
            return out
        except Exception as err:  # noqa: BLE001 - any compile/runtime failure: plain ATen from now on
            _STATE["off"] = True
            warnings.warn(f"deftly.kernels: compiled transpose unavailable ({type(err).__name__}: {err}); "
                          "using ATen's copy", RuntimeWarning, stacklevel=2)
    out.copy_(src.t())
    return out


def pretransposed(w: Tensor, x: Tensor) -> Tensor:
    """``w.transpose(1, 2)`` of a stack of small weights, made contiguous when the weight is small next to
    the activations ``x``: ``bmm`` reads a transposed operand ~1.5x slower here, but copying a large weight
    at a small batch costs more than that (a 16 MB weight at batch 1)."""
    wt = w.transpose(1, 2)
    return wt.contiguous() if 4 * w.numel() <= x.numel() else wt
