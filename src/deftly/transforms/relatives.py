"""Relatives of the DFT as sparse-factor operators: DCT-II, circulant, Toeplitz, circular convolution.

* ``dct(n)`` — type-II DCT (scipy.fft.dct's definition, ``norm="ortho"`` by default) by Makhoul's
  reordering: ``v = (x_0, x_2, x_4, ..., x_5, x_3, x_1)``,
  ``DCT(x)_k = Re(c_k exp(-i pi k / 2n) F_n v)`` — a gather, an ``n``-point DFT of any ``n``, and one
  real-part-of-diagonal stage (J. Makhoul, "A fast cosine transform in one and two dimensions", IEEE
  Trans. ASSP 28, 1980).
* ``circulant(c)`` — ``C[i, j] = c[(i - j) mod n]`` (``scipy.linalg.circulant``) as
  ``F^{-1} diag(F c) F``: two DFTs and a diagonal (Golub & Van Loan, "Matrix Computations", sec. 4.8).
* ``toeplitz(c, r)`` — ``T[i, j] = c[i - j]`` (i >= j), ``r[j - i]`` (i < j) (``scipy.linalg.toeplitz``),
  embedded in a circulant of power-of-two size ``L >= m + n - 1``: pad, circulant, truncate.
* :class:`CircularConv1d` — a learnable circular convolution layer ``y = circulant(pad(w)) x`` computed
  with these FFT factors (``O(n log n)`` per row, whatever the kernel size).

Real ``c`` gives a real operator (real input, the real part of the complex product as output).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import StructuredLinear, check_int, init_uniform_
from ..layers.butterfly import makhoul_order
from .dft import _check_n, dft_plan
from .operators import Compose, Diagonal, Gather, Operator, RealPart, ToComplex

__all__ = ["DCT", "Circulant", "CircularConv1d", "Toeplitz", "circulant", "dct", "toeplitz"]


def _real_dtype(owner: str, dtype: Any) -> torch.dtype:
    dtype = torch.float64 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{owner}: dtype={dtype!r} is not supported; use torch.float64 (default) or "
                        f"torch.float32")
    return dtype


class DCT(Compose):
    """Type-II DCT of length ``n`` by Makhoul's algorithm; see :func:`dct`."""

    def __init__(self, n: int, norm: str = "ortho", *, dtype: torch.dtype | None = None) -> None:
        n = _check_n("dct", n)
        if norm not in ("ortho", "backward"):
            raise ValueError(f"dct: norm={norm!r} must be 'ortho' (orthonormal) or 'backward' (scipy's "
                             f"unnormalised 2 sum x_j cos(...))")
        dtype = _real_dtype("dct", dtype)
        cdtype = dtype.to_complex()
        k = torch.arange(n, dtype=torch.float64)
        if norm == "ortho":
            c = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
            c[0] = math.sqrt(1.0 / n)
        else:
            c = torch.full((n,), 2.0, dtype=torch.float64)
        d = torch.polar(c, -math.pi * k / (2 * n))  # c_k exp(-i pi k / 2n)
        super().__init__([Gather.permutation(makhoul_order(n), dtype), ToComplex(n, dtype),
                          dft_plan(n, -1, cdtype), RealPart(n, cdtype, d)])
        self.n, self.norm = n, norm


def dct(n: int, norm: str = "ortho", *, dtype: torch.dtype | None = None) -> DCT:
    """The ``n``-point DCT-II, ``scipy.fft.dct(x, type=2, norm=norm)``, any ``n``; real in, real out."""
    return DCT(n, norm, dtype=dtype)


def _as_vector(owner: str, name: str, c: Any) -> Tensor:
    c = torch.as_tensor(c)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"{owner}: {name} must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
    if not (c.is_floating_point() or c.is_complex()):
        c = c.to(torch.float64)
    return c


def _circulant_ops(col: Tensor, dtype: torch.dtype) -> list[Operator]:
    """Factors of ``F^{-1} diag(F col) F`` (real ``dtype``: cast in, real part out)."""
    n = col.numel()
    cdtype = dtype if dtype.is_complex else dtype.to_complex()
    fc = dft_plan(n, -1, torch.complex128)._apply_cols(col.to(torch.complex128).unsqueeze(1)).squeeze(1)
    ops: list[Operator] = [] if dtype.is_complex else [ToComplex(n, dtype)]
    ops += [dft_plan(n, -1, cdtype), Diagonal(fc / n, cdtype), dft_plan(n, 1, cdtype)]
    if not dtype.is_complex:
        ops.append(RealPart(n, cdtype))
    return ops


def _dtype_for(c: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.complex128 if c.is_complex() else torch.float64


class Circulant(Compose):
    """``C[i, j] = c[(i - j) mod n]``; see :func:`circulant`."""

    c: Tensor

    def __init__(self, c: Any, *, dtype: torch.dtype | None = None) -> None:
        c = _as_vector("circulant", "c", c)
        dtype = _dtype_for(c, dtype)
        if c.is_complex() and not dtype.is_complex:
            raise TypeError(f"circulant: c is complex but dtype={dtype}; pass a complex dtype")
        super().__init__(_circulant_ops(c, dtype))
        self._constant("c", c, dtype)


def circulant(c: Any, *, dtype: torch.dtype | None = None) -> Circulant:
    """The circulant matrix with first column ``c`` as ``F^{-1} diag(F c) F`` (any length).

    ``dtype`` defaults to float64 for real ``c`` (a real operator) and complex128 for complex ``c``.
    """
    return Circulant(c, dtype=dtype)


class Toeplitz(Compose):
    """``T[i, j] = c[i - j]`` for ``i >= j`` else ``r[j - i]``, shape ``(len(c), len(r))``."""

    def __init__(self, c: Any, r: Any = None, *, dtype: torch.dtype | None = None) -> None:
        c = _as_vector("toeplitz", "c", c)
        r = c.conj() if r is None else _as_vector("toeplitz", "r", r)
        dtype = _dtype_for(c if c.is_complex() else r, dtype)
        m, n = c.numel(), r.numel()
        L = 1 << (m + n - 2).bit_length()  # power of two >= m + n - 1
        col = torch.zeros(L, dtype=torch.promote_types(c.dtype, r.dtype))
        col[:m] = c
        if n > 1:
            col[L - n + 1:] = r[1:].flip(0)  # col[L - t] = r[t]
        super().__init__([Gather.pad(n, L, dtype), *_circulant_ops(col, dtype), Gather.pad(L, m, dtype)])
        self.L = L


def toeplitz(c: Any, r: Any = None, *, dtype: torch.dtype | None = None) -> Toeplitz:
    """Toeplitz ``(len(c), len(r))`` with first column ``c`` and first row ``r`` (``r[0]`` ignored;
    ``r=None`` means ``conj(c)``, as ``scipy.linalg.toeplitz``), through a power-of-two circulant."""
    return Toeplitz(c, r, dtype=dtype)


class CircularConv1d(StructuredLinear):
    """Learnable circular convolution ``y[i] = sum_j w[j] x[(i - j) mod n]`` (+ bias), by FFT.

    ``n = max(in, out)``: the input is zero-padded to ``n`` and the first ``out`` outputs kept. The
    kernel ``w`` has ``kernel_size`` taps (default ``n``, a full circulant). Each forward transforms the
    kernel once (``flops(batch)`` includes it) and each row by ``F^{-1} diag(F w / n) F``.
    Not in the registry (it lives with the transforms); ``to_dense()`` is the circulant built from ``w``.
    """

    name = "circconv"
    flop_counter_exact = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 kernel_size: int | None = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.n = max(in_features, out_features)
        k = self.n if kernel_size is None else kernel_size
        self.kernel_size = check_int("CircularConv1d", "kernel_size", k, maximum=self.n,
                                     fix=f"use 1 <= kernel_size <= max(in, out) = {self.n}")
        self.weight = nn.Parameter(torch.empty(self.kernel_size, **self._factory))
        wd = self.weight.dtype
        cd = wd if wd.is_complex else wd.to_complex()
        self.fft = dft_plan(self.n, -1, cd)
        self.ifft = dft_plan(self.n, 1, cd)
        self.reset_parameters()

    def hparams(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size}

    def _reset_structure(self) -> None:
        # y_i sums kernel_size taps over inputs of which a fraction in/n are real
        init_uniform_(self.weight, self.n / (3.0 * self.kernel_size * self.in_features))

    def _kernel_column(self) -> Tensor:
        return F.pad(self.weight, (0, self.n - self.kernel_size))  # (n,)

    def _matmul(self, x: Tensor) -> Tensor:
        cd = self.fft.in_dtype
        h = F.pad(x, (0, self.n - self.in_features)).T.to(cd)  # (n, batch)
        fw = self.fft._apply_cols(self._kernel_column().to(cd).unsqueeze(1)) / self.n  # (n, 1)
        y = self.ifft._apply_cols(fw * self.fft._apply_cols(h))[:self.out_features].T  # (batch, out)
        return y if self.weight.is_complex() else y.real

    def _reference_matmul(self, x: Tensor) -> Tensor:
        w = self._kernel_column()
        xp = F.pad(x, (0, self.n - self.in_features))
        cols = []
        for i in range(self.out_features):
            acc = xp.new_zeros(xp.shape[0], dtype=torch.promote_types(xp.dtype, w.dtype))
            for j in range(self.kernel_size):
                acc = acc + w[j] * xp[:, (i - j) % self.n]
            cols.append(acc)
        return torch.stack(cols, -1)

    def to_dense(self) -> Tensor:
        i = torch.arange(self.out_features).unsqueeze(1)
        j = torch.arange(self.in_features).unsqueeze(0)
        return self._kernel_column()[(i - j) % self.n]  # C[i, j] = w[(i - j) mod n]

    @classmethod
    def param_count(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        unknown = sorted(set(hparams) - {"kernel_size"})
        if unknown:
            raise TypeError(f"CircularConv1d.param_count: unknown hyperparameters {unknown}; "
                            f"it takes kernel_size only")
        kernel_size = hparams.get("kernel_size")
        return max(in_features, out_features) if kernel_size is None else kernel_size

    def flops(self, batch: int = 1) -> int:
        per_row = 2 * self.fft.row_flops() + 6 * self.n  # F, diag (complex x complex), F^{-1}
        return batch * per_row + self.fft.row_flops() + 2 * self.n  # + the kernel's F and 1/n
