"""Out-of-place 2-D transpose ``out (n, m) <- src (m, n)^T`` for large CPU tensors.

ATen's copy of a transposed 2-D tensor is a scalar, single-threaded blocked loop (~5-6 GB/s here);
Inductor generates a vectorised (16x16 register tiles), OpenMP-parallel kernel for the same copy. The
compiled kernel (``dynamic=True``: one compile for every shape, cached on disk by Inductor) is used for
tensors of at least :data:`MIN_NUMEL` elements; anything that fails (no C++ compiler, ...) falls back to
ATen for the rest of the process. ``DEFTLY_NO_INDUCTOR=1`` disables it.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
from torch import Tensor

__all__ = ["CACHE_BYTES", "MIN_NUMEL", "cached_transpose", "clear_transposes", "pretransposed", "transpose_into"]

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


#: weights up to this many bytes get a cached contiguous transpose in the no-gradient small-batch paths
CACHE_BYTES = 4 << 20
# id(w) -> (weak reference to w, version, data pointer, w.transpose(1, 2).contiguous())
_T_CACHE: dict[int, tuple] = {}


def _drop(ref, key: int) -> None:
    hit = _T_CACHE.get(key)
    if hit is not None and hit[0] is ref:
        del _T_CACHE[key]


def cached_transpose(w: Tensor) -> Tensor:
    """``w.transpose(1, 2)`` of a stack of weights, as a contiguous copy kept while ``w`` is the same tensor
    at the same version and data pointer. For forwards that record no gradient (the caller's duty):
    ``bmm`` reads a transposed operand ~1.4x slower at batch 1, and copying it every call costs more than
    that. Weights above :data:`CACHE_BYTES` and inference tensors get the plain view."""
    hit = _T_CACHE.get(id(w))
    if hit is not None and hit[0]() is w:
        try:
            if hit[1] == w._version and hit[2] == w.data_ptr():
                return hit[3]
        except RuntimeError:  # a tensor without storage now: never served from the cache
            pass
    wt = w.transpose(1, 2)
    if w.numel() * w.element_size() > CACHE_BYTES or torch.compiler.is_compiling():
        return wt
    try:
        ver = w._version
        ptr = w.data_ptr()
    except RuntimeError:  # inference tensors carry no version counter; functorch/fake tensors no storage
        return wt
    key = id(w)
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode later
        c = wt.contiguous()
    _T_CACHE[key] = (weakref.ref(w, functools.partial(_drop, key=key)), ver, ptr, c)
    return c


def clear_transposes() -> None:
    """Forget every cached transpose."""
    _T_CACHE.clear()
