"""The discrete Fourier transform of any size as a product of sparse factors, and the Hadamard transform.

``dft(n)`` is ``F[k, j] = exp(-2 pi i jk / n)`` (numpy's convention) built recursively:

* ``n = 2^k``: Cooley–Tukey radix-2 decimation in time — a bit-reversal gather then ``k`` butterfly
  stages (:class:`~deftly.transforms.operators.Radix2`), ``5 n log2 n`` FLOPs (minus the trivial twiddles
  of the first stage);
* ``n = n1 n2`` composite (Cooley–Tukey mixed radix, the "four-step" / Monarch form): with
  ``x[j1 n2 + j2]`` viewed as an ``(n1, n2)`` array,
  ``F_n = (F_{n2} ⊗ I_{n1}) P diag(w^{k1 j2}) (F_{n1} ⊗ I_{n2})`` where ``P`` is the ``(n1, n2) -> (n2, n1)``
  transpose gather: ``F_{n1} ⊗ I_{n2}`` and ``F_{n2} ⊗ I_{n1}`` are block-diagonal DFTs up to the stride
  permutation (applied by a reshape), ``n1`` = the power-of-two part of ``n`` when there is one, else its
  smallest prime factor, and ``F_{n2}`` recursively;
* prime ``n`` (and prime factors): a small dense DFT block, or Bluestein's chirp-z through a
  power-of-two FFT (:mod:`deftly.transforms.bluestein`), whichever costs fewer FLOPs
  (``prime="auto"``), or as forced.

Cooley & Tukey, Math. Comp. 19 (1965); Van Loan, "Computational Frameworks for the Fast Fourier
Transform" (SIAM 1992), ch. 1-4; Bluestein, IEEE Trans. Audio Electroacoust. 18 (1970).
Rounding error grows like ``O(log n)`` (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 24).

Also ``hadamard(n)``: Sylvester's ``H_n = H_2 ⊗ ... ⊗ H_2`` by the fast Walsh–Hadamard transform.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import check_int
from .operators import (
    Compose,
    DenseMatrix,
    Diagonal,
    Gather,
    KronIdentity,
    Operator,
    Radix2,
    Scale,
    unit_roots,
)

__all__ = ["DFT", "NORMS", "PRIME_MODES", "dft", "dft_plan", "hadamard", "idft", "smallest_prime_factor"]

NORMS = ("backward", "ortho", "forward")
PRIME_MODES = ("auto", "bluestein", "dense")


def smallest_prime_factor(n: int) -> int:
    if n % 2 == 0:
        return 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return f
        f += 2
    return n


def _check_n(owner: str, n: Any) -> int:
    return check_int(owner, "n", n, fix="n is the transform length; use n >= 1.")


def _complex_dtype(owner: str, dtype: Any) -> torch.dtype:
    dtype = torch.complex128 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not (dtype.is_complex or dtype.is_floating_point):
        raise TypeError(f"{owner}: dtype={dtype!r} is not a float or complex torch dtype; "
                        f"use torch.complex128 (default) or torch.complex64")
    if dtype.is_floating_point:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{owner}: dtype={dtype} has no complex counterpart in torch; use "
                            f"torch.complex64 or torch.complex128 (bfloat16: see Radix2.apply_real_pairs)")
        dtype = dtype.to_complex()
    return dtype


def dense_dft_matrix(n: int, sign: int = -1) -> torch.Tensor:
    """``(n, n)`` complex128 ``exp(sign 2 pi i jk / n)``, exponents reduced mod ``n`` exactly."""
    j = torch.arange(n)
    return unit_roots(n, j.unsqueeze(1) * j.unsqueeze(0), sign)


def dft_plan(n: int, sign: int, dtype: torch.dtype, prime: str = "auto") -> Operator:
    """The unnormalised ``exp(sign 2 pi i jk/n)`` transform as an :class:`Operator` tree."""
    if n == 1:
        return Gather.permutation(torch.arange(1), dtype)
    if n & (n - 1) == 0:
        return Radix2(n, sign, bitrev=True, dtype=dtype)
    p = smallest_prime_factor(n)
    if p == n:
        return _prime_plan(n, sign, dtype, prime)
    low = n & -n  # largest power of two dividing n
    n1 = low if low > 1 else p
    n2 = n // n1
    j = torch.arange(n)
    k1, j2 = j // n2, j % n2  # after the first step, entry k1 * n2 + j2 holds (k1, j2)
    transpose = torch.arange(n).reshape(n1, n2).T.reshape(-1)  # (n1, n2) -> (n2, n1)
    return Compose([
        KronIdentity(dft_plan(n1, sign, dtype, prime), n2),  # F_{n1} along j1, for every j2
        Diagonal(unit_roots(n, k1 * j2, sign), dtype),  # twiddles w_n^{k1 j2}
        Gather.permutation(transpose, dtype),  # now (j2, k1)
        KronIdentity(dft_plan(n2, sign, dtype, prime), n1),  # F_{n2} along j2: (k2, k1) = X[k1 + n1 k2]
    ])


def _prime_plan(p: int, sign: int, dtype: torch.dtype, prime: str) -> Operator:
    from .bluestein import bluestein

    if prime == "dense":
        return DenseMatrix(dense_dft_matrix(p, sign), dtype)
    blue = bluestein(p, sign, dtype)
    # a dense p x p complex block costs 8 p^2 FLOPs per row (DenseMatrix.row_flops), built only if chosen
    if prime == "bluestein" or blue.row_flops() < 8 * p * p:
        return blue
    return DenseMatrix(dense_dft_matrix(p, sign), dtype)


class DFT(Compose):
    """The ``n``-point DFT (or inverse) as a product of sparse factors; see :func:`dft`."""

    def __init__(self, n: int, inverse: bool = False, norm: str = "backward", *,
                 dtype: torch.dtype | None = None, prime: str = "auto") -> None:
        n = _check_n("dft", n)
        if norm not in NORMS:
            raise ValueError(f"dft: norm={norm!r} is not one of {', '.join(NORMS)} (numpy.fft's conventions)")
        if prime not in PRIME_MODES:
            raise ValueError(f"dft: prime={prime!r} is not one of {', '.join(PRIME_MODES)}")
        if not isinstance(inverse, bool):
            raise TypeError(f"dft: inverse={inverse!r} must be True or False")
        dtype = _complex_dtype("dft", dtype)
        sign = 1 if inverse else -1
        ops: list[Operator] = [dft_plan(n, sign, dtype, prime)]
        scale = {"backward": 1.0 / n if inverse else 1.0, "forward": 1.0 if inverse else 1.0 / n,
                 "ortho": n ** -0.5}[norm]
        if scale != 1.0:
            ops.append(Scale(n, scale, dtype))
        super().__init__(ops)
        self.n, self.inverse, self.norm, self.prime = n, inverse, norm, prime

    def hparams(self) -> dict[str, Any]:
        return {"n": self.n, "inverse": self.inverse, "norm": self.norm}

    def extra_repr(self) -> str:
        return f"n={self.n}, inverse={self.inverse}, norm={self.norm!r}, " + super().extra_repr()


def dft(n: int, inverse: bool = False, norm: str = "backward", *, dtype: torch.dtype | None = None,
        prime: str = "auto") -> DFT:
    """The ``n``-point DFT ``F[k, j] = exp(-2 pi i jk/n)`` (``inverse``: ``exp(+...)``) as an operator.

    Args:
        n: any length >= 1; ``O(n log n)`` FLOPs when the prime factors are small or handled by Bluestein.
        inverse: the inverse transform.
        norm: ``"backward"`` (forward unscaled, inverse ``1/n``), ``"ortho"`` (both ``1/sqrt n``) or
            ``"forward"`` (forward ``1/n``) — numpy.fft's conventions.
        dtype: ``torch.complex128`` (default) or ``torch.complex64`` (float dtypes map to their complex).
        prime: how prime factors > 2 are done: ``"auto"`` (fewer FLOPs), ``"bluestein"`` or ``"dense"``.

    Returns a :class:`DFT` (an :class:`~deftly.transforms.base.Operator`): ``forward`` on ``(*, n)`` inputs
    (real inputs are cast), ``to_dense()`` from its sparse factors, exact ``flops()``.
    """
    return DFT(n, inverse, norm, dtype=dtype, prime=prime)


def idft(n: int, norm: str = "backward", *, dtype: torch.dtype | None = None, prime: str = "auto") -> DFT:
    """``dft(n, inverse=True, ...)``."""
    return DFT(n, True, norm, dtype=dtype, prime=prime)


class Hadamard(Compose):
    """Sylvester's Hadamard matrix ``H_n`` (``n = 2^k``), optionally scaled by ``1/sqrt n``."""

    def __init__(self, n: int, norm: str = "backward", *, dtype: torch.dtype | None = None) -> None:
        n = _check_n("hadamard", n)
        if n & (n - 1):
            raise ValueError(f"hadamard: n={n} is not a power of two (Sylvester's construction); use "
                             f"n={1 << (n - 1).bit_length()} and zero-pad")
        if norm not in ("backward", "ortho"):
            raise ValueError(f"hadamard: norm={norm!r} must be 'backward' (+-1 entries) or 'ortho'")
        dtype = torch.float64 if dtype is None else dtype
        ops: list[Operator] = [Radix2(n, None, bitrev=False, dtype=dtype)]
        if norm == "ortho" and n > 1:
            ops.append(Scale(n, n ** -0.5, dtype))
        super().__init__(ops)
        self.n, self.norm = n, norm


def hadamard(n: int, norm: str = "backward", *, dtype: torch.dtype | None = None) -> Hadamard:
    """Sylvester's ``H_n`` (``+-1`` entries, ``scipy.linalg.hadamard``) by the fast Walsh–Hadamard
    transform, ``n log2 n`` FLOPs (real); ``norm="ortho"`` scales by ``1/sqrt n``. Default dtype float64."""
    return Hadamard(n, norm, dtype=dtype)
