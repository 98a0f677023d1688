"""Bluestein's chirp-z algorithm: a DFT of any length through power-of-two FFTs.

Bluestein, "A linear filtering approach to the computation of discrete Fourier transform", IEEE Trans.
Audio Electroacoust. 18 (1970); Rabiner, Schafer & Rader, "The chirp z-transform algorithm" (1969).

With ``jk = (j^2 + k^2 - (k - j)^2) / 2`` and the chirp ``w_m = exp(sign pi i m^2 / n)``:
``X_k = w_k sum_j b_{k-j} (w_j x_j)``, ``b_m = conj(w_m)``: ``F_n = diag(w) T diag(w)`` with ``T`` the
Toeplitz matrix of ``b``. ``T`` is embedded in a circulant of power-of-two size ``M >= 2n - 1`` and applied
as ``F_M^{-1} diag(F_M b_ext) F_M``, so the whole DFT is the product of sparse factors

    Gather(M -> n) · FFT_M^{-1} · diag(F_M b_ext / M) · FFT_M · Gather(n -> M) · diag(w)

followed by ``diag(w)``. Chirp exponents ``m^2`` are reduced mod ``2n`` in integers before the angle is
formed, so the chirp is accurate for large ``n``.
"""

from __future__ import annotations

import torch

from .operators import Compose, Diagonal, Gather, Radix2, unit_roots

__all__ = ["Bluestein", "bluestein"]


class Bluestein(Compose):
    """The ``exp(sign 2 pi i jk / n)`` transform by the chirp-z identity; ``M`` = inner FFT size."""

    def __init__(self, n: int, sign: int, dtype: torch.dtype) -> None:
        M = 1 << (2 * n - 2).bit_length()  # smallest power of two >= 2n - 1
        m = torch.arange(n)
        chirp = unit_roots(2 * n, m * m, sign)  # w_m = exp(sign 2 pi i m^2 / 2n)
        b_ext = torch.zeros(M, dtype=torch.complex128)
        b_ext[:n] = chirp.conj()
        b_ext[M - n + 1:] = chirp.conj()[1:].flip(0)  # b_{-m} = b_m at M - m
        # F_M b_ext in complex128 with the same radix-2 factors, scaled by 1/M for the unscaled inverse
        fb = Radix2(M, -1, bitrev=True, dtype=torch.complex128)._apply_cols(b_ext.unsqueeze(1)).squeeze(1) / M
        super().__init__([
            Diagonal(chirp, dtype),
            Gather.pad(n, M, dtype),
            Radix2(M, -1, bitrev=True, dtype=dtype),
            Diagonal(fb, dtype),
            Radix2(M, 1, bitrev=True, dtype=dtype),
            Gather.pad(M, n, dtype),
            Diagonal(chirp, dtype),
        ])
        self.n, self.M, self.sign = n, M, sign

    def extra_repr(self) -> str:
        return f"n={self.n}, M={self.M}, " + super().extra_repr()


def bluestein(n: int, sign: int = -1, dtype: torch.dtype = torch.complex128) -> Bluestein:
    """The unnormalised ``n``-point DFT (``sign=-1``) or inverse (``+1``) via Bluestein's algorithm."""
    return Bluestein(n, sign, dtype)
