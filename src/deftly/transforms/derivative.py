"""Differentiation as a matrix multiply on a periodic grid: spectral and finite-difference operators.

``derivative(n, method, length)`` maps samples ``f(x_j)``, ``x_j = j * length / n``, of a ``length``-
periodic function to samples of its derivative (``order``-th derivative with ``order=``):

* ``"spectral"`` — ``F^{-1} diag((i k)^order) F`` with wavenumbers ``k = 2 pi / length * (0, 1, ...,
  -1)``; for even ``n`` and odd ``order`` the Nyquist mode ``k = n/2`` is zeroed (its derivative is not
  real), as in Trefethen, "Spectral Methods in MATLAB" (SIAM 2000), ch. 3. Exponentially accurate for
  smooth periodic functions. A product of sparse DFT factors (:mod:`deftly.transforms.dft`).
* ``"fd2"`` / ``"fd4"`` — central finite differences of accuracy order 2 / 4 (Fornberg, Math. Comp. 51,
  1988): a ``deftly.make("banded", n, n, lower=w, upper=w)`` layer holding the stencil on its diagonals
  plus a :class:`~deftly.transforms.operators.SparseMatrix` of the ``w (w + 1)`` periodic wrap-around
  corner entries (a band matrix cannot hold them), summed. The banded weights are frozen.
"""

from __future__ import annotations

import math

import torch

from ..core import check_int, make
from .dft import _check_n, dft_plan
from .operators import Compose, Diagonal, LayerOperator, Operator, RealPart, SparseMatrix, Sum, ToComplex
from .relatives import _real_dtype

__all__ = ["STENCILS", "Derivative", "derivative", "grid"]

#: central stencils: (method, order) -> coefficients at offsets -w..w, to divide by h**order
STENCILS = {
    ("fd2", 1): [-0.5, 0.0, 0.5],
    ("fd4", 1): [1 / 12, -2 / 3, 0.0, 2 / 3, -1 / 12],
    ("fd2", 2): [1.0, -2.0, 1.0],
    ("fd4", 2): [-1 / 12, 4 / 3, -5 / 2, 4 / 3, -1 / 12],
}
METHODS = ("spectral", "fd2", "fd4")


def grid(n: int, length: float = 2 * math.pi, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The periodic grid ``x_j = j * length / n``, ``j = 0..n-1``."""
    return torch.arange(n, dtype=torch.float64).mul(length / n).to(dtype)


def wavenumbers(n: int, length: float) -> torch.Tensor:
    """``2 pi / length * (0, 1, ..., ceil(n/2) - 1, -floor(n/2), ..., -1)`` (numpy.fft.fftfreq * n)."""
    j = torch.arange(n)
    return torch.where(j < (n + 1) // 2, j, j - n).to(torch.float64) * (2 * math.pi / length)


class Derivative:
    """Namespace of the builders; :func:`derivative` returns an operator with these attributes set:
    ``n``, ``method``, ``length``, ``order``, ``h``."""

    @staticmethod
    def spectral(n: int, length: float, order: int, dtype: torch.dtype) -> Compose:
        cd = dtype.to_complex()
        ik = (1j * wavenumbers(n, length).to(torch.complex128)) ** order
        if n % 2 == 0 and order % 2 == 1:
            ik[n // 2] = 0.0  # Nyquist mode
        return Compose([ToComplex(n, dtype), dft_plan(n, -1, cd), Diagonal(ik / n, cd), dft_plan(n, 1, cd),
                        RealPart(n, cd)])

    @staticmethod
    def finite_difference(n: int, method: str, length: float, order: int, dtype: torch.dtype) -> Sum:
        coef = torch.tensor(STENCILS[(method, order)], dtype=torch.float64) / (length / n) ** order
        w = (coef.numel() - 1) // 2
        if n < 2 * w + 1:
            raise ValueError(f"derivative: n={n} is too small for the {method} stencil of width {2 * w + 1}; "
                             f"use n >= {2 * w + 1} or method='spectral'")
        # built in float64 (the operator remembers exact coefficients, so casts recompute them), then cast
        band = make("banded", n, n, bias=False, lower=w, upper=w, dtype=torch.float64)
        weight = band.get_parameter("weight")
        i = torch.arange(n)
        rows, cols, vals = [], [], []
        with torch.no_grad():
            weight.zero_()
            for d in range(2 * w + 1):  # weight[d, i] is the entry (i, i + d - w)
                j = i + d - w
                inside = (j >= 0) & (j < n)
                weight[d, inside] = coef[d]
                rows.append(i[~inside])
                cols.append(j[~inside] % n)  # periodic wrap-around
                vals.append(coef[d].expand(int((~inside).sum())))
        band.requires_grad_(False)
        corners = SparseMatrix(torch.cat(rows), torch.cat(cols), torch.cat(vals), (n, n), torch.float64)
        return Sum([LayerOperator(band), corners]).to(dtype)


def derivative(n: int, method: str = "spectral", length: float = 2 * math.pi, *, order: int = 1,
               dtype: torch.dtype | None = None) -> Operator:
    """The ``order``-th derivative on ``n`` periodic samples of period ``length`` as a structured operator.

    ``method``: ``"spectral"`` (``F^{-1} diag((ik)^order) F``, any order), ``"fd2"`` or ``"fd4"``
    (banded central differences with periodic corners; ``order`` 1 or 2). Real ``(*, n) -> (*, n)``;
    ``dtype`` float64 (default) or float32.
    """
    n = _check_n("derivative", n)
    if method not in METHODS:
        raise ValueError(f"derivative: method={method!r} is not one of {', '.join(METHODS)}")
    order = check_int("derivative", "order", order, fix="order is the derivative's order, e.g. 1 or 2")
    if not (isinstance(length, (int, float)) and math.isfinite(length) and length > 0):
        raise ValueError(f"derivative: length={length!r} must be a positive finite number (the period)")
    real = _real_dtype("derivative", dtype)
    op: Operator
    if method == "spectral":
        op = Derivative.spectral(n, float(length), order, real)
    else:
        if (method, order) not in STENCILS:
            raise ValueError(f"derivative: method={method!r} supports order 1 or 2, got order={order}; "
                             f"use method='spectral' for higher orders")
        op = Derivative.finite_difference(n, method, float(length), order, real)
    # plain attributes; torch annotates nn.Module.__setattr__'s value as Tensor | Module only (it takes any)
    op.n, op.method, op.length = n, method, float(length)  # type: ignore[assignment]
    op.order, op.h = order, float(length) / n  # type: ignore[assignment]
    return op
