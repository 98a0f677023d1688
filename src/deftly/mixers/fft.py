"""FFT back ends for the long convolutions: ``torch.fft``, the FFT written as Monarch (four-step, matmuls
with small dense DFT matrices) and deftly's own sparse DFT factors (radix-2 butterflies / mixed radix).

All three compute the same circular convolution of length ``n`` (chosen by :func:`fft_length`, at least
``2T - 1`` so that it equals the linear one — see :mod:`deftly.mixers.conv`). Inputs are *time-last*:
``u: (..., d, n)`` real, ``k: (d, n)`` real, output ``(..., d, n)`` real.

**Monarch FFT (four-step / Bailey).** Write ``n = n1 n2`` and the time index ``j = j1 n2 + j2``. Then

    X[k1 + n1 k2] = sum_{j2} w_{n2}^{j2 k2} w_n^{j2 k1} sum_{j1} w_{n1}^{j1 k1} x[j1, j2]

so the DFT is: a block of ``n1 x n1`` DFTs over ``j1`` (one matmul), an elementwise twiddle
``w_n^{k1 j2}``, then ``n2``-point DFTs over ``j2`` (recursively the same, down to dense leaves of at most
``leaf`` points) — Monarch's ``P^T L P R`` with ``L``, ``R`` block-diagonal DFTs. Position ``r1 n2 + r2`` of
the result holds frequency ``r1 + n1 sigma(r2)`` (``sigma`` the sub-transform's order): the spectrum comes
out in a *digit-reversed order* and is never permuted back, because a convolution only multiplies
spectra elementwise — the filter goes through the same transform, and :func:`monarch_ifft` accepts that
order and returns the signal in natural order (the trick of FlashFFTConv, Fu et al. 2023). No
permutation is ever applied; all index bookkeeping is reshapes.

Small matrices and twiddles are built from sizes (complex128, exponents reduced mod ``n`` in integers)
and cached per ``(sizes, dtype, device)`` in this module, never stored on a module (so meta-device init
and ``to_empty`` have nothing to rebuild).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["FFT_PATHS", "check_fft", "fft_length", "monarch_factors", "monarch_fft", "monarch_frequencies",
           "monarch_ifft", "smooth_length"]

#: the FFT back ends of :func:`deftly.mixers.causal_conv` (first = default)
FFT_PATHS = ("torch", "monarch", "butterfly")
#: largest dense DFT block of the Monarch FFT (the recursion splits larger sizes)
LEAF = 32


def check_fft(owner: str, fft) -> str:
    """Validate the ``fft=`` keyword: a clear error listing the choices, with a close-match hint."""
    if isinstance(fft, str) and fft in FFT_PATHS:
        return fft
    import difflib

    close = difflib.get_close_matches(str(fft), FFT_PATHS, n=1) if isinstance(fft, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{owner}: fft={fft!r} is not an FFT path; choose one of: "
                     f"{', '.join(map(repr, FFT_PATHS))} ('torch' is the fastest on CPU).{hint}")


def smooth_length(m: int) -> int:
    """The smallest ``2^a 3^b 5^c >= m`` (a length every FFT here handles without large prime factors)."""
    m = max(int(m), 1)
    best = 1 << (m - 1).bit_length()  # a power of two always qualifies
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < m:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


def fft_length(T: int, fft: str = "torch") -> int:
    """FFT length for a linear (non-wrapping) convolution of ``T`` samples with a ``T``-tap filter (or a
    two-sided one with lags ``-(T-1)..T-1``): at least ``2T - 1``. ``"butterfly"`` uses the next power
    of two (pure radix-2 butterflies); ``"torch"`` and ``"monarch"`` the next 5-smooth length."""
    need = 2 * T - 1
    return 1 << (need - 1).bit_length() if fft == "butterfly" else smooth_length(need)


# ----------------------------------------------------------------------------- the Monarch FFT
def monarch_factors(n: int, leaf: int = LEAF) -> tuple[int, ...]:
    """Sizes of the dense DFT blocks, ``prod == n``, each ``<= leaf`` where the prime factors allow,
    as balanced as possible (fewest passes, then the smallest blocks)."""
    primes, m, f = [], n, 2
    while f * f <= m:
        while m % f == 0:
            primes.append(f)
            m //= f
        f += 1
    if m > 1:
        primes.append(m)
    levels = max(1, math.ceil(math.log(n) / math.log(leaf) - 1e-9)) if n > 1 else 1
    while True:
        groups = [1] * levels
        for p in sorted(primes, reverse=True):  # largest prime into the currently smallest group
            i = min(range(levels), key=lambda g: groups[g])
            groups[i] *= p
        if max(groups) <= leaf or levels >= len(primes):
            return tuple(sorted(groups, reverse=True))
        levels += 1


def _roots(n: int, exponents: Tensor, sign: int) -> Tensor:
    """``exp(sign 2 pi i e / n)`` in complex128, ``e`` reduced mod ``n`` in integers first (exact angles)."""
    e = torch.remainder(exponents.to(torch.long), n).to(torch.float64)
    ang = (sign * 2.0 * math.pi / n) * e
    return torch.polar(torch.ones_like(ang), ang)


@lru_cache(maxsize=256)
def _dft_matrix_cpu(n: int, sign: int, scale: float) -> Tensor:
    j = torch.arange(n)
    return _roots(n, j[:, None] * j[None, :], sign) * scale  # (n, n) complex128


@lru_cache(maxsize=256)
def _twiddle_cpu(n1: int, n2: int, sign: int) -> Tensor:
    return _roots(n1 * n2, torch.arange(n1)[:, None] * torch.arange(n2)[None, :], sign)  # (n1, n2)


_DEVICE_CACHE: dict = {}


def _const(kind: str, args: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A DFT matrix or twiddle table in ``dtype`` on ``device`` (cached; rebuilt under tracing)."""
    build = _dft_matrix_cpu if kind == "dft" else _twiddle_cpu
    if torch.compiler.is_compiling():  # dynamo traces the construction; no global side effects
        return build.__wrapped__(*args).to(device=device, dtype=dtype)
    key = (kind, args, dtype, str(device))
    t = _DEVICE_CACHE.get(key)
    if t is None:
        if len(_DEVICE_CACHE) > 512:
            _DEVICE_CACHE.clear()
        t = _DEVICE_CACHE[key] = build(*args).to(device=device, dtype=dtype)
    return t


def _leaf(h: Tensor, M: Tensor) -> Tensor:
    """``M (n, n)`` applied along the middle axis of ``h: (P, n, Q)`` -> ``(P, n, Q)``."""
    P, n, Q = h.shape
    if Q == 1:
        return (h.reshape(P, n) @ M.T).reshape(P, n, 1)  # one GEMM
    if P == 1:
        return (M @ h.reshape(n, Q)).reshape(1, n, Q)  # one GEMM
    return torch.matmul(M, h)  # (n, n) @ (P, n, Q): one batched GEMM


def _leaf_real_in(h: Tensor, M: Tensor) -> Tensor:
    """Real ``h`` times complex ``M``: two real matmuls instead of one complex on a cast copy."""
    return torch.complex(_leaf(h, M.real.contiguous()), _leaf(h, M.imag.contiguous()))


def _leaf_real_out(h: Tensor, M: Tensor) -> Tensor:
    """``Re(M h)`` for complex ``M``, ``h``: two real matmuls."""
    return _leaf(h.real.contiguous(), M.real.contiguous()) - _leaf(h.imag.contiguous(), M.imag.contiguous())


def _fwd(h: Tensor, sizes: tuple[int, ...], cdtype: torch.dtype, real_in: bool) -> Tensor:
    """Unnormalised DFT along the middle axis of ``h: (P, n, Q)``, ``n = prod(sizes)``, output in the
    digit-reversed order of :func:`monarch_frequencies`."""
    P, n, Q = h.shape
    n1 = sizes[0]
    F1 = _const("dft", (n1, -1, 1.0), cdtype, h.device)
    if len(sizes) == 1:
        return _leaf_real_in(h, F1) if real_in else _leaf(h, F1)
    n2 = n // n1
    h = h.reshape(P, n1, n2 * Q)  # j = j1 n2 + j2: DFT over j1 for every (j2, q)
    h = _leaf_real_in(h, F1) if real_in else _leaf(h, F1)  # (P, k1, n2 Q)
    tw = _const("tw", (n1, n2, -1), cdtype, h.device)  # w_n^{k1 j2}
    h = h.reshape(P, n1, n2, Q) * tw.unsqueeze(-1)
    h = _fwd(h.reshape(P * n1, n2, Q), sizes[1:], cdtype, False)  # (P n1, sigma(k2), Q)
    return h.reshape(P, n, Q)


def _inv(h: Tensor, sizes: tuple[int, ...], cdtype: torch.dtype, real_out: bool) -> Tensor:
    """Inverse of :func:`_fwd` (the ``1/n`` included): digit-reversed spectrum -> natural-order signal."""
    P, n, Q = h.shape
    n1 = sizes[0]
    G1 = _const("dft", (n1, 1, 1.0 / n1), cdtype, h.device)
    if len(sizes) == 1:
        return _leaf_real_out(h, G1) if real_out else _leaf(h, G1)
    n2 = n // n1
    h = _inv(h.reshape(P * n1, n2, Q), sizes[1:], cdtype, False)  # over k2 for every k1: (P n1, j2, Q)
    tw = _const("tw", (n1, n2, 1), cdtype, h.device)  # w_n^{-k1 j2}
    h = (h.reshape(P, n1, n2, Q) * tw.unsqueeze(-1)).reshape(P, n1, n2 * Q)
    h = _leaf_real_out(h, G1) if real_out else _leaf(h, G1)  # over k1: (P, j1, n2 Q)
    return h.reshape(P, n, Q)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def monarch_fft(x: Tensor, sizes: tuple[int, ...] | None = None) -> Tensor:
    """DFT of real ``x: (..., n)`` along the last axis, as matmuls with dense DFT blocks of ``sizes``
    (default :func:`monarch_factors`); output ``(..., n)`` complex, frequencies in the order of
    :func:`monarch_frequencies` (``out[..., i] == torch.fft.fft(x)[..., monarch_frequencies(sizes)[i]]``)."""
    n = x.shape[-1]
    sizes = monarch_factors(n) if sizes is None else tuple(sizes)
    lead = x.shape[:-1]
    h = x.reshape(-1, n, 1)  # (cols, n, 1): time-last rows
    return _fwd(h, sizes, _complex_of(x.dtype), True).reshape(*lead, n)


def monarch_ifft(X: Tensor, sizes: tuple[int, ...] | None = None) -> Tensor:
    """Real part of the inverse DFT (``1/n`` scaled) of ``X: (..., n)`` given in the order of
    :func:`monarch_fft`; output ``(..., n)`` real, natural order."""
    n = X.shape[-1]
    sizes = monarch_factors(n) if sizes is None else tuple(sizes)
    lead = X.shape[:-1]
    return _inv(X.reshape(-1, n, 1), sizes, X.dtype, True).reshape(*lead, n)


def monarch_frequencies(sizes: tuple[int, ...]) -> Tensor:
    """``sigma``: position ``i`` of :func:`monarch_fft`'s output holds frequency ``sigma[i]``."""
    if len(sizes) == 1:
        return torch.arange(sizes[0])
    n1, rest = sizes[0], monarch_frequencies(sizes[1:])
    return (torch.arange(n1)[:, None] + n1 * rest[None, :]).reshape(-1)


# ----------------------------------------------------------------------------- deftly's DFT operators
_OPS: dict = {}


def _on(op, device: torch.device):
    """Move an operator's buffers to ``device``. (``Operator`` defines its own ``_apply`` — its fast
    multiply — which shadows ``nn.Module._apply``, so ``op.to(device)`` cannot be used.)"""
    if torch.device(device).type != "cpu":
        for m in op.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.to(device)
    return op


def dft_operators(n: int, cdtype: torch.dtype, device: torch.device):
    """``(dft(n), idft(n))`` from :mod:`deftly.transforms` (radix-2 butterfly stages for powers of two,
    mixed radix / Bluestein otherwise) in ``cdtype`` on ``device``, cached. ``torch.compile(fullgraph=True)``
    needs them built once eagerly (modules cannot be constructed inside a graph); without ``fullgraph``
    a first call builds them behind a graph break."""
    key = (n, cdtype, str(device))
    ops = _OPS.get(key)  # under torch.compile: found if this length ran once eagerly (or graph break)
    if ops is None:
        from .. import transforms

        ops = (_on(transforms.dft(n, dtype=cdtype), device), _on(transforms.idft(n, dtype=cdtype), device))
        if not torch.compiler.is_compiling():
            if len(_OPS) > 64:
                _OPS.clear()
            _OPS[key] = ops
    return ops
