"""Learning a fast transform from examples: fit a trainable butterfly to ``(x, T x)`` pairs.

Dao et al., "Learning Fast Algorithms for Linear Transforms Using Butterfly Factorizations" (ICML 2019)
recover the DFT, DCT and Hadamard transforms to machine precision by gradient descent on a butterfly
(with a fixed or learned permutation). Here: a randomly initialised ``deftly.make("butterfly", n, n)``
(complex with the bit-reversal input gather for the DFT; real without permutation for Hadamard), Adam
with a cosine learning-rate decay on fresh Gaussian batches ``x`` and targets ``T x`` computed by the
exact operator, and the recovery measured as ``RMSE = sqrt(mean |W - T|^2)`` of the dense matrices.
Used by ``tests/test_learn_transform.py`` and ``benchmarks/learn_transform.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..core import StructuredLinear, make
from .base import Operator

__all__ = ["FitResult", "fit_transform", "learnable_butterfly_for"]


@dataclass
class FitResult:
    rmse: float  #: sqrt(mean |W - T|^2) at the end
    seconds: float  #: wall time of the optimisation
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)  #: (step, rmse) samples


def learnable_butterfly_for(kind: str, n: int, *, dtype: torch.dtype = torch.float32,
                            seed: int = 0) -> StructuredLinear:
    """A randomly initialised bias-free butterfly able to represent ``kind`` (``"dft"``/``"hadamard"``)."""
    torch.manual_seed(seed)
    if kind == "dft":
        return make("butterfly", n, n, bias=False, complex=True, perm="bitrev", dtype=dtype)
    if kind == "hadamard":
        return make("butterfly", n, n, bias=False, dtype=dtype)
    raise ValueError(f"learnable_butterfly_for: kind={kind!r} must be 'dft' or 'hadamard'")


def fit_transform(layer: StructuredLinear, target: Operator, *, steps: int = 400, lr: float = 0.1,
                  batch: int | None = None, seed: int = 0, log_every: int = 0) -> FitResult:
    """Fit ``layer`` (bias-free, square) to the fixed operator ``target`` from ``(x, target(x))`` pairs.

    Each step draws ``batch`` (default ``n``) standard Gaussian inputs (complex if the layer is), takes one
    Adam step on ``mean |layer(x) - target(x)|^2``; the learning rate follows a cosine decay to 0.
    """
    n = layer.in_features
    dtype = layer.weight_dtype
    want = target.to_dense().to(layer.to_dense().dtype)  # (n, n), for the RMSE only
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []

    def rmse() -> float:
        with torch.no_grad():
            return (layer.to_dense() - want).abs().pow(2).mean().sqrt().item()

    t0 = time.perf_counter()
    for step in range(steps):
        x = torch.randn(batch or n, n, generator=gen, dtype=dtype)
        with torch.no_grad():
            y = target(x.to(target.in_dtype)).to(want.dtype)  # (batch, n) exact T x
        loss = (layer(x) - y).abs().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            history.append((step, rmse()))
    seconds = time.perf_counter() - t0
    final = rmse()
    if not math.isfinite(final):
        raise FloatingPointError(f"fit_transform diverged (rmse={final}); lower lr={lr}")
    return FitResult(final, seconds, steps, history)
