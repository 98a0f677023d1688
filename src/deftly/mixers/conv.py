"""Long convolutions along the sequence: causal (``y = k * x``) and bidirectional, by FFT, any length.

Shape contract (public functions, sequence-major like attention)::

    causal_conv(x, k)              x: (batch, T, d), k: (d, L >= T)              -> (batch, T, d)
        y[b, t, c] = sum_{s=0}^{t} k[c, s] x[b, t - s, c]
    bidirectional_conv(x, k, k_rev) x: (batch, T, d), k: (d, L >= T), k_rev: (d, L' >= T - 1)
        y[b, t, c] = sum_{s=0}^{t} k[c, s] x[b, t - s, c] + sum_{s=0}^{T-2-t} k_rev[c, s] x[b, t + 1 + s, c]

Taps beyond ``T - 1`` (``T - 2`` for ``k_rev``) cannot reach any output and are ignored, so one filter of
``max_len`` taps serves every ``T <= max_len``.

**Causal padding.** An FFT multiplies spectra, which is a *circular* convolution of length ``n``: output
``t`` receives ``x[t - s mod n]``, i.e. for ``n = T`` the future wraps into the past. Zero-padding ``x``
and the filter to ``n >= 2T - 1`` makes every wrapped index land on a zero (lags ``-(T-1)..T-1`` are
distinct mod ``n``), so the circular result restricted to ``t < T`` is the linear convolution — exactly
causal. The bidirectional filter puts ``k_rev[s]`` (lag ``-(s + 1)``) at position ``n - 1 - s``.

**Cost.** ``O(T log T)`` per channel and sequence (three length-``n`` transforms, the filter's shared by
the batch) against ``O(T^2)`` for the direct sum (:func:`direct_causal_conv`, the slow reference, and for
attention).

**Paths** (``fft=``): ``"torch"`` (``torch.fft.rfft``/``irfft``, default, fastest on CPU), ``"monarch"``
(the FFT as Monarch matmuls, :func:`deftly.mixers.fft.monarch_fft`), ``"butterfly"`` (deftly's own sparse
DFT factors, :func:`deftly.transforms.dft`: radix-2 butterfly stages). Gradients come from a hand-written
backward (frequency-domain adjoints; future positions get exactly zero gradient), gradchecked in float64;
double backward is refused.

**Dtypes.** Real floating inputs only. float32 and float64 are computed in their own precision;
float16/bfloat16 (no complex counterpart in torch's FFT) are computed in float32 and the result cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fft import check_fft, dft_operators, fft_length, monarch_factors, monarch_fft, monarch_ifft

__all__ = ["bidirectional_conv", "causal_conv", "check_sequence", "combined_filter", "conv_tokens",
           "direct_bidirectional_conv", "direct_causal_conv", "gated_conv", "gated_conv_reference", "long_conv"]


# ----------------------------------------------------------------------------- input checks
def check_sequence(owner: str, x, d: int | None = None, max_len: int | None = None) -> tuple[int, int, int]:
    """Validate ``x: (batch, T, d)``: a real floating tensor, ``T >= 1``, ``T <= max_len`` and the channel
    count ``d`` when given. Returns ``(batch, T, channels)``; errors name the sizes and the fix."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor of shape (batch, T, d), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{owner}: input has shape {tuple(x.shape)} ({x.dim()}-d) but must be (batch, T, d); "
                         f"add a batch dimension with x.unsqueeze(0) or reshape to (batch, T, d)")
    if x.is_complex():
        raise TypeError(f"{owner}: input dtype {x.dtype} is complex; the sequence mixers take real signals — "
                        f"pass x.real or split real and imaginary parts into channels")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: input dtype {x.dtype} is not floating point; cast it first, e.g. x.float() "
                        f"(token ids go through an nn.Embedding before a mixer)")
    b, t, c = x.shape
    if t == 0:
        raise ValueError(f"{owner}: input shape {tuple(x.shape)} has an empty sequence (T=0); pass at least one "
                         f"position (T >= 1)")
    if d is not None and c != d:
        raise ValueError(f"{owner}: input has {c} channels (shape {tuple(x.shape)}) but the mixer was built with "
                         f"d={d}; pass inputs of shape (batch, T, {d}) or build it with d={c}")
    if max_len is not None and t > max_len:
        raise ValueError(f"{owner}: sequence length T={t} exceeds max_len={max_len}; build the mixer with "
                         f"max_len >= {t} (its filters are defined on lags 0..max_len-1) or split the sequence "
                         f"into chunks of at most {max_len}")
    return b, t, c


def _check_filter(owner: str, name: str, k, d: int, need: int, x: Tensor) -> None:
    shape = f"({d}, L >= {need})"
    if not isinstance(k, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor of shape {shape}, got {type(k).__name__}")
    if k.is_complex() or not k.is_floating_point():
        raise TypeError(f"{owner}: {name} dtype {k.dtype} must be real floating point, e.g. {name}.float()")
    if k.dim() != 2 or k.shape[0] != d:
        raise ValueError(f"{owner}: {name} has shape {tuple(k.shape)} but must be {shape}: one filter per "
                         f"channel of the input (d={d})")
    if k.shape[1] < need:
        raise ValueError(f"{owner}: {name} has {k.shape[1]} taps but the sequence has T={x.shape[1]}, which needs "
                         f"at least {need}; pass a filter of length >= {need} (e.g. evaluate the filter at T, "
                         f"or zero-pad it: F.pad({name}, (0, {need - k.shape[1]})))")
    if k.device != x.device:
        raise ValueError(f"{owner}: {name} is on {k.device} but the input is on {x.device}; move one of them")


# ----------------------------------------------------------------------------- the kernels
def _compute_dtype(*ts: Tensor) -> tuple[torch.dtype, torch.dtype]:
    out = ts[0].dtype
    for t in ts[1:]:
        out = torch.promote_types(out, t.dtype)
    comp = out if out in (torch.float32, torch.float64) else torch.float32
    return comp, out


def _transforms(fft: str, n: int, dtype: torch.dtype, device: torch.device):
    """``(fwd, inv)`` for one path: ``fwd`` maps real ``(..., n)`` to a spectrum, ``inv`` a spectrum back to
    real ``(..., n)`` (``1/n`` included). Spectra of one path multiply and conjugate elementwise, whatever
    their frequency order (the Monarch FFT's is digit-reversed)."""
    if fft == "torch":
        return torch.fft.rfft, (lambda X: torch.fft.irfft(X, n=n))
    if fft == "monarch":
        sizes = monarch_factors(n)
        return (lambda x: monarch_fft(x, sizes)), (lambda X: monarch_ifft(X, sizes))
    if fft == "butterfly":
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        dft, idft = dft_operators(n, cdtype, device)
        return (lambda x: dft(x.to(cdtype))), (lambda X: idft(X).real)
    check_fft("long_conv", fft)
    raise AssertionError  # pragma: no cover


def _padded(B: int, d: int, T: int, n: int, like: Tensor) -> Tensor:
    """A ``(B, d, n)`` time-last buffer whose tail ``[..., T:]`` is zero (the head is written by the caller:
    one pass, the transpose fused into that write)."""
    buf = like.new_empty(B, d, n)
    buf[..., T:].zero_()
    return buf


def _mask_future_(grad: Tensor, g: Tensor) -> Tensor:
    """Zero ``grad[..., t']`` (time-last) where ``g[..., t] == 0`` for every ``t >= t'``: there the exact input
    gradient of a causal convolution is exactly zero (its adjoint is anti-causal) and the FFT leaves only
    rounding. Rows whose last ``g`` entry is nonzero (the usual case in training) cost one comparison."""
    if not torch.compiler.is_compiling() and bool((g[..., -1] != 0).all()):
        return grad
    T = g.shape[-1]
    nz = (g != 0).flip(-1)
    last = T - 1 - nz.to(torch.uint8).argmax(-1, keepdim=True)  # last nonzero position (T - 1 if none)
    keep = (torch.arange(T, device=g.device) <= last) & nz.any(-1, keepdim=True)
    return grad.mul_(keep)


#: time steps per tile of the transposing passes (measured: 256 keeps the strided side in L1/L2; one
#: untiled (B, T, d) <-> (B, d, T) pass at T = 65536 was 8x slower than the tiled one on this CPU)
TILE = 256


def _mul_into(out: Tensor, a: Tensor, b: Tensor | None, dim: int) -> None:
    """``out[...] = a * b`` (or ``= a`` when ``b`` is None), all of one logical shape, in tiles of ``TILE``
    along the time axis ``dim``: the passes between the time-major and time-last layouts transpose, and a
    whole-length transposing pass thrashes the cache for long sequences. Under torch.compile, which refuses
    strided ``out=``, a product then a copy per tile."""
    T = out.shape[dim]
    compiling = torch.compiler.is_compiling()
    for t0 in range(0, T, TILE):
        n = min(TILE, T - t0)
        o, x = out.narrow(dim, t0, n), a.narrow(dim, t0, n)
        if b is None:
            o.copy_(x)
        elif compiling:
            o.copy_(x * b.narrow(dim, t0, n))
        else:
            torch.mul(x, b.narrow(dim, t0, n), out=o)


def _time_major(z: Tensor, T: int) -> Tensor:
    """``z[..., :T]`` of a time-last ``(B, d, n)`` buffer as a contiguous ``(B, T, d)`` (tiled transpose)."""
    y = z.new_empty(z.shape[0], T, z.shape[1])
    _mul_into(y, z[..., :T].transpose(1, 2), None, 1)
    return y


def _batch_correlation(G: Tensor, X: Tensor) -> Tensor:
    """``sum_b G[b] conj(X[b])``: ``(B, d, f), (B, d, f) -> (d, f)``, accumulated in place (no ``(B, d, f)``
    temporary)."""
    acc = G[0] * X[0].conj()
    for b in range(1, G.shape[0]):
        acc.addcmul_(G[b], X[b].conj())
    return acc


class _CircularConv(torch.autograd.Function):
    """``y (B, T, d) = (circular convolution along time of x (B, T, d), zero-padded to n, with kk (d, n))[:T]``
    — the linear convolution when ``n >= 2T - 1``, ``kk`` holding lags ``0..T-1`` at ``0..T-1`` and lag
    ``-m`` at ``n - m``. Transforms run on a time-last padded buffer written by one (tiled) transposed copy;
    the output is transposed back the same way.

    Backward (adjoints in the frequency domain, forward spectra saved, no re-transform of ``x``):
    ``grad_x = (F^-1(G conj K))[:T]``, ``grad_kk = F^-1(sum_batch G conj X)``; for a causal ``kk`` the input
    gradient is zeroed exactly after the last nonzero of ``grad_y``, where the exact gradient vanishes, so
    future positions get exactly zero gradient on every path.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kk: Tensor, fft: str, causal: bool) -> Tensor:
        B, T, d = x.shape
        n = kk.shape[-1]
        fwd, inv = _transforms(fft, n, x.dtype, x.device)
        buf = _padded(B, d, T, n, x)
        _mul_into(buf[..., :T], x.transpose(1, 2), None, 2)
        X, K = fwd(buf), fwd(kk)  # (B, d, f), (d, f)
        del buf
        ctx.save_for_backward(X, K)
        ctx.meta = (T, n, fft, causal)
        return _time_major(inv(X * K), T)  # (B, T, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        X, K = ctx.saved_tensors
        T, n, fft, causal = ctx.meta
        B, _, d = gy.shape
        fwd, inv = _transforms(fft, n, gy.dtype, gy.device)
        buf = _padded(B, d, T, n, gy)
        _mul_into(buf[..., :T], gy.transpose(1, 2), None, 2)
        G = fwd(buf)  # (B, d, f)
        grad_x = grad_k = None
        if ctx.needs_input_grad[1]:
            grad_k = inv(_batch_correlation(G, X))  # (d, n)
        if ctx.needs_input_grad[0]:
            gx = inv(G.mul_(K.conj()))[..., :T]  # (B, d, T) view
            if causal:
                gx = _mask_future_(gx, buf[..., :T])
            grad_x = gx.new_empty(B, T, d)
            _mul_into(grad_x, gx.transpose(1, 2), None, 1)
        return grad_x, grad_k, None, None


class _GatedConv(torch.autograd.Function):
    """The mixer's core on the time-major projections ``u = [a, g, v]: (B, T, 3d)``:
    ``y = a * conv(g * v)`` (conv as :class:`_CircularConv`) -> ``(B, T, d)``, with the gate products fused
    into the transposed writes of the time-last buffers and the input gradient written into one
    ``(B, T, 3d)`` tensor (no split/cat, no separate transposes: fewer large temporaries, which on this CPU
    cost more in page faults than in arithmetic)."""

    @staticmethod
    def forward(ctx, u: Tensor, kk: Tensor, fft: str, causal: bool) -> Tensor:
        B, T, d3 = u.shape
        d, n = d3 // 3, kk.shape[-1]
        a, g, v = u.split(d, dim=-1)
        fwd, inv = _transforms(fft, n, u.dtype, u.device)
        buf = _padded(B, d, T, n, u)
        _mul_into(buf[..., :T], g.transpose(1, 2), v.transpose(1, 2), 2)  # v' = g v, time-last
        V, K = fwd(buf), fwd(kk)
        del buf
        z = inv(V * K)  # (B, d, n); z[..., :T] = conv(v')
        y = u.new_empty(B, T, d)
        _mul_into(y, a, z[..., :T].transpose(1, 2), 1)  # output gate, (B, T, d)
        ctx.save_for_backward(u, V, K, z)
        ctx.meta = (T, n, fft, causal)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        u, V, K, z = ctx.saved_tensors
        T, n, fft, causal = ctx.meta
        B, _, d3 = u.shape
        d = d3 // 3
        a, g, v = u.split(d, dim=-1)
        fwd, inv = _transforms(fft, n, gy.dtype, gy.device)
        grad_u = grad_k = None
        buf = _padded(B, d, T, n, gy)
        _mul_into(buf[..., :T], gy.transpose(1, 2), a.transpose(1, 2), 2)  # d L / d conv(v')
        G = fwd(buf)
        if ctx.needs_input_grad[1]:
            grad_k = inv(_batch_correlation(G, V))
        if ctx.needs_input_grad[0]:
            grad_u = torch.empty_like(u)
            _mul_into(grad_u[..., :d], gy, z[..., :T].transpose(1, 2), 1)  # d L / d a
            gv = inv(G.mul_(K.conj()))[..., :T]  # d L / d v', (B, d, T)
            if causal:
                gv = _mask_future_(gv, buf[..., :T])
            gv = gv.transpose(1, 2)
            _mul_into(grad_u[..., d:2 * d], gv, v, 1)
            _mul_into(grad_u[..., 2 * d:], gv, g, 1)
        return grad_u, grad_k, None, None


def combined_filter(k: Tensor, k_rev: Tensor | None, T: int, n: int, dtype: torch.dtype) -> Tensor:
    """``(d, n)``: lags ``0..T-1`` from ``k`` at positions ``0..T-1``, lag ``-(s+1)`` from ``k_rev[s]`` at
    ``n - 1 - s`` (zeros elsewhere) — the circular kernel whose convolution of length ``n >= 2T - 1`` is the
    linear one."""
    kk = k[:, :T].to(dtype)
    parts = [kk, kk.new_zeros(kk.shape[0], n - T - (T - 1 if k_rev is not None else 0))]
    if k_rev is not None and T > 1:
        parts.append(k_rev[:, :T - 1].to(dtype).flip(-1))
    return torch.cat(parts, -1)


def _fft_size(T: int, fft: str, n: int | None) -> int:
    n = fft_length(T, fft) if n is None else n
    if n < 2 * T - 1:
        raise ValueError(f"long_conv: n={n} < 2T - 1 = {2 * T - 1} would wrap the future into the past; "
                         f"use n >= {2 * T - 1} (default: fft_length(T))")
    return n


def conv_tokens(x: Tensor, k: Tensor, k_rev: Tensor | None = None, *, fft: str = "torch",
                n: int | None = None) -> Tensor:
    """The convolution kernel on token-major ``x: (B, T, d)`` (no input checks): causal taps ``k: (d, >= T)``,
    optional anti-causal ``k_rev: (d, >= T - 1)``; ``n`` the FFT length (default :func:`fft_length`).
    Returns ``(B, T, d)`` in the promoted dtype (float32 compute for half precision)."""
    T = x.shape[1]
    n = _fft_size(T, fft, n)
    comp, out = _compute_dtype(x, k, *(() if k_rev is None else (k_rev,)))
    kk = combined_filter(k, k_rev, T, n, comp)
    if x.numel() == 0:  # an empty batch: the FFT libraries refuse zero-sized transforms
        return (x.to(comp) * kk.sum() * 0).to(out)
    return _CircularConv.apply(x.to(comp), kk, fft, k_rev is None).to(out)


def gated_conv(u: Tensor, k: Tensor, k_rev: Tensor | None = None, *, fft: str = "torch",
               n: int | None = None) -> Tensor:
    """``a * conv(g * v)`` for ``u = [a, g, v]: (B, T, 3d)`` (no input checks; :class:`MonarchMixer`'s
    core): ``k``, ``k_rev``, ``fft``, ``n`` as :func:`conv_tokens`. Returns ``(B, T, d)``.
    Reference: :func:`gated_conv_reference`."""
    T = u.shape[1]
    n = _fft_size(T, fft, n)
    comp, out = _compute_dtype(u, k, *(() if k_rev is None else (k_rev,)))
    kk = combined_filter(k, k_rev, T, n, comp)
    if u.numel() == 0:
        return (u[..., : u.shape[-1] // 3].to(comp) * kk.sum() * 0).to(out)
    return _GatedConv.apply(u.to(comp), kk, fft, k_rev is None).to(out)


def gated_conv_reference(u: Tensor, k: Tensor, k_rev: Tensor | None = None) -> Tensor:
    """:func:`gated_conv` by plain autograd ops and the direct ``O(T^2)`` convolution (for tests)."""
    a, g, v = u.split(u.shape[-1] // 3, dim=-1)
    conv = direct_causal_conv(g * v, k) if k_rev is None else direct_bidirectional_conv(g * v, k, k_rev)
    return a * conv


def long_conv(u: Tensor, k: Tensor, k_rev: Tensor | None = None, *, fft: str = "torch",
              n: int | None = None) -> Tensor:
    """:func:`conv_tokens` on *time-last* ``u: (..., d, T)`` -> ``(..., d, T)`` (no input checks)."""
    lead = u.shape[:-2]
    x = u.reshape(-1, *u.shape[-2:]).transpose(1, 2)  # (B, T, d)
    return conv_tokens(x, k, k_rev, fft=fft, n=n).transpose(1, 2).reshape(*lead, *u.shape[-2:])


# ----------------------------------------------------------------------------- public API
def causal_conv(x: Tensor, k: Tensor, *, fft: str = "torch") -> Tensor:
    """Causal long convolution ``y[b, t, c] = sum_{s<=t} k[c, s] x[b, t-s, c]`` in ``O(T log T)``.

    Args:
        x: ``(batch, T, d)`` real floating, any ``T >= 1`` (not only powers of two).
        k: ``(d, L)`` one filter per channel, ``L >= T`` (taps past ``T - 1`` are unused).
        fft: ``"torch"`` (default), ``"monarch"`` (FFT as Monarch matmuls) or ``"butterfly"`` (deftly's
            sparse DFT factors); all exact to rounding (~1e-15 relative in float64).

    Returns ``(batch, T, d)`` (a transposed view of a time-last result), dtype of ``x`` and ``k`` promoted.
    Output ``t`` never depends on inputs after ``t``: the FFT is zero-padded to length ``>= 2T - 1``.
    """
    fft = check_fft("causal_conv", fft)
    _, _, d = check_sequence("causal_conv", x)
    _check_filter("causal_conv", "k", k, d, x.shape[1], x)
    return conv_tokens(x, k, fft=fft)


def bidirectional_conv(x: Tensor, k: Tensor, k_rev: Tensor, *, fft: str = "torch") -> Tensor:
    """Non-causal (encoder) long convolution: the causal part of :func:`causal_conv` plus
    ``sum_s k_rev[c, s] x[b, t + 1 + s, c]`` over the future, one FFT convolution of length ``>= 2T - 1``.

    Args:
        x: ``(batch, T, d)``; k: ``(d, L >= T)`` lags ``0..T-1``; k_rev: ``(d, L' >= T - 1)`` lags
        ``-1..-(T-1)``; fft: as in :func:`causal_conv`.
    """
    fft = check_fft("bidirectional_conv", fft)
    _, T, d = check_sequence("bidirectional_conv", x)
    _check_filter("bidirectional_conv", "k", k, d, T, x)
    _check_filter("bidirectional_conv", "k_rev", k_rev, d, T - 1, x)
    return conv_tokens(x, k, k_rev, fft=fft)


# ----------------------------------------------------------------------------- slow references
def direct_causal_conv(x: Tensor, k: Tensor) -> Tensor:
    """The ``O(T^2)`` definition, one shifted multiply-add per lag: ``(batch, T, d), (d, >= T)`` ->
    ``(batch, T, d)``. For tests (run it in float64)."""
    T = x.shape[1]
    y = torch.zeros_like(x)
    for s in range(T):
        y[:, s:, :] += k[:, s] * x[:, :T - s, :]
    return y


def direct_bidirectional_conv(x: Tensor, k: Tensor, k_rev: Tensor) -> Tensor:
    """The ``O(T^2)`` definition of :func:`bidirectional_conv` (for tests)."""
    T = x.shape[1]
    y = direct_causal_conv(x, k)
    for s in range(T - 1):  # k_rev[s] multiplies x[t + 1 + s]
        y[:, :T - 1 - s, :] += k_rev[:, s] * x[:, 1 + s:, :]
    return y
