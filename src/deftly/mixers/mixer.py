"""``MonarchMixer``: a gated long-convolution sequence mixer (order-2 Hyena / Monarch Mixer), a drop-in for
an attention sublayer — ``(batch, T, d) -> (batch, T, d)`` for any ``T <= max_len``.

What it computes (``x: (batch, T, d)``; every product elementwise, per channel ``c``)::

    [a, g, v] = shortconv(W_in x)                 W_in: d -> 3d (any registered structure; Monarch default)
                                                  shortconv: depthwise, `short_kernel` taps, causal padding
    v'        = g * v                             input gate
    z[t]      = sum_{s<=t} h[c, s] v'[t - s] + D[c] v'[t]     long causal convolution (FFT, O(T log T))
    y         = W_out (a * z)                     output gate, W_out: d -> d

``h`` is an implicit (Hyena) or explicit filter (:mod:`deftly.mixers.filters`). ``causal=False`` (encoders)
adds the anti-causal taps ``sum_s h_rev[c, s] v'[t + 1 + s]`` and centres the short convolution.

Poli et al., "Hyena Hierarchy", ICML 2023 (order-2 operator ``y = x_2 (h * (x_1 v))``); Fu et al.,
"Monarch Mixer", NeurIPS 2023 (Monarch projections; the long convolution as an FFT, here selectable as
``torch.fft`` or the FFT *written as* Monarch matmuls / deftly's butterfly factors).

Cost per sequence: projections ``O(T d^2)`` (less when structured), convolution ``O(T log T d)`` — against
attention's ``O(T^2 d)``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._common import LinearFactory, check_pos_int, linear_factory
from .conv import check_sequence, gated_conv
from .fft import check_fft
from .filters import ExplicitFilter, ImplicitFilter

__all__ = ["FILTERS", "MonarchMixer", "short_conv", "short_conv_reference"]

FILTERS = ("implicit", "explicit")


def _taps(K: int, causal: bool) -> list[tuple[int, int]]:
    """``(tap j, shift s)``: tap ``j`` multiplies ``u[t - s]`` (``s = j`` causal, ``j - K // 2`` centred)."""
    off = 0 if causal else K // 2
    return [(j, j - off) for j in range(K)]


def _shift_acc_(y: Tensor, u: Tensor, w: Tensor, s: int) -> None:
    """``y[:, t] += w * u[:, t - s]`` where ``0 <= t - s < T`` (in place)."""
    T = u.shape[1]
    if s >= T or -s >= T:
        return
    if s >= 0:
        y[:, s:].addcmul_(u[:, :T - s], w)
    else:
        y[:, :T + s].addcmul_(u[:, -s:], w)


def _channel_dot(a: Tensor, b: Tensor, chunk: int = 1 << 18) -> Tensor:
    """``sum_{i,t} a[i, t, c] b[i, t, c]`` for ``(B, T', C)`` views, in slices of about ``chunk`` entries so
    that the products stay small, cache-resident temporaries (one ``(B, T', C)`` product would be a fresh,
    page-faulted allocation per tap)."""
    B, Tp, C = a.shape
    acc = a.new_zeros(C)
    if Tp * C <= chunk:  # whole sequences per slice
        step = max(1, chunk // max(Tp * C, 1))
        for i in range(0, B, step):
            acc += (a[i:i + step] * b[i:i + step]).sum((0, 1))
        return acc
    rows = max(1, chunk // C)  # time steps per slice
    for i in range(B):
        for t in range(0, Tp, rows):
            acc += (a[i, t:t + rows] * b[i, t:t + rows]).sum(0)
    return acc


class _ShortConv(torch.autograd.Function):
    """Depthwise time convolution with a hand-written backward (autograd through the in-place shifted
    updates would copy the full gradient once per tap)."""

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
        taps = _taps(weight.shape[1], causal)
        wt = weight.T.contiguous()  # (K, C): contiguous rows to broadcast over (B, T, C)
        j0 = next(j for j, s in taps if s == 0)
        y = torch.addcmul(bias, u, wt[j0]) if bias is not None else u * wt[j0]
        for j, s in taps:
            if s != 0:
                _shift_acc_(y, u, wt[j], s)
        ctx.save_for_backward(u, wt)
        ctx.causal, ctx.has_bias = causal, bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        u, wt = ctx.saved_tensors
        taps = _taps(wt.shape[0], ctx.causal)
        T = u.shape[1]
        grad_u = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the adjoint: shifts reversed
            j0 = next(j for j, s in taps if s == 0)
            grad_u = gy * wt[j0]
            for j, s in taps:
                if s != 0:
                    _shift_acc_(grad_u, gy, wt[j], -s)
        if ctx.needs_input_grad[1]:  # grad_w[c, j] = sum_{b,t} gy[b, t, c] u[b, t - s, c]
            cols = []
            for _, s in taps:
                if abs(s) >= T:
                    cols.append(gy.new_zeros(gy.shape[-1]))
                elif s >= 0:
                    cols.append(_channel_dot(gy[:, s:], u[:, :T - s]))
                else:
                    cols.append(_channel_dot(gy[:, :T + s], u[:, -s:]))
            grad_w = torch.stack(cols, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum((0, 1))
        return grad_u, grad_w, grad_b, None


def short_conv(u: Tensor, weight: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    """Depthwise convolution along time in the time-major layout of the projections.

    ``u: (batch, T, C)``, ``weight: (C, K)``, ``bias: (C,)`` -> ``(batch, T, C)``:
    causal ``y[:, t] = bias + sum_{j<K} weight[:, j] u[:, t - j]`` (zeros outside ``0..T-1``); otherwise the
    window is centred, ``y[:, t] = bias + sum_j weight[:, j] u[:, t - j + K // 2]``. Shifted multiply-adds on
    contiguous channels, no transposes; reference :func:`short_conv_reference` (``F.conv1d``).
    """
    return _ShortConv.apply(u, weight, bias, causal)


def short_conv_reference(u: Tensor, weight: Tensor, bias: Tensor | None, causal: bool) -> Tensor:
    """:func:`short_conv` by ``F.conv1d`` on the channels-first layout (for tests)."""
    K = weight.shape[1]
    pad = (K - 1, 0) if causal else ((K - 1) // 2, K // 2)
    y = F.conv1d(F.pad(u.transpose(1, 2), pad), weight.flip(-1).unsqueeze(1), bias, groups=u.shape[2])
    return y.transpose(1, 2)


class MonarchMixer(nn.Module):
    """Gated long-convolution sequence mixer; see the module docstring for the equations.

    Args:
        d: model width (channels of the input and output).
        max_len: longest sequence it accepts (the filters' length).
        causal: ``True`` (decoders: output ``t`` never sees inputs after ``t``) or ``False`` (encoders).
        fft: ``"torch"`` (default), ``"monarch"`` or ``"butterfly"`` — the FFT of the long convolution.
        filter: ``"implicit"`` (Hyena MLP, parameters independent of ``max_len``; default) or
            ``"explicit"`` (``d x max_len`` free taps). ``filter_kwargs`` go to its class.
        structure, structure_kwargs: the channel-mixing projections ``W_in`` (d -> 3d) and ``W_out``
            (d -> d) as ``deftly.make(structure, ...)`` — any registered structure, Monarch by default.
        linear: instead of ``structure``, a callable ``(in, out) -> nn.Module`` building the projections.
        short_kernel: taps of the depthwise short convolution (``>= 1``).
        bias: biases of the projections and the short convolution.
        device, dtype: factory arguments (``device="meta"`` then ``to_empty`` + ``load_state_dict`` works).
    """

    def __init__(self, d: int, max_len: int, causal: bool = True, *, fft: str = "torch",
                 filter: str = "implicit", filter_kwargs: dict | None = None, structure: str = "monarch",
                 structure_kwargs: dict | None = None, linear: LinearFactory | None = None, short_kernel: int = 3,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        owner = "MonarchMixer"
        self.d = check_pos_int(owner, "d", d, "d is the model width (channels).")
        self.max_len = check_pos_int(owner, "max_len", max_len, "max_len is the longest sequence length.")
        if not isinstance(causal, bool):
            raise TypeError(f"{owner}: causal={causal!r} must be True (decoder) or False (encoder)")
        self.causal = causal
        self.fft = check_fft(owner, fft)
        if filter not in FILTERS:
            import difflib

            close = difflib.get_close_matches(str(filter), FILTERS, n=1)
            raise ValueError(f"{owner}: filter={filter!r} is not one of {', '.join(map(repr, FILTERS))}"
                             + (f". Did you mean {close[0]!r}?" if close else ""))
        self.filter_kind = filter
        self.short_kernel = check_pos_int(owner, "short_kernel", short_kernel, "Use e.g. short_kernel=3.")
        fk = {"device": device, "dtype": dtype}
        make = linear_factory(owner, structure, structure_kwargs, linear, bias, device, dtype)
        self.in_proj = make(d, 3 * d)
        self.out_proj = make(d, d)
        self.conv_weight = nn.Parameter(torch.empty(3 * d, short_kernel, **fk))  # (3d, K) depthwise
        self.conv_bias = nn.Parameter(torch.empty(3 * d, **fk)) if bias else None
        channels = d if causal else 2 * d  # bidirectional: causal taps, then anti-causal taps
        cls = ImplicitFilter if filter == "implicit" else ExplicitFilter
        self.filter = cls(channels, max_len, **(filter_kwargs or {}), **fk)
        self.skip = nn.Parameter(torch.empty(d, **fk))  # D: the unfiltered path of the long convolution
        self._reset_own()

    def _reset_own(self) -> None:
        K = self.short_kernel
        with torch.no_grad():
            bound = K ** -0.5  # nn.Conv1d's default for a depthwise kernel (fan-in K)
            self.conv_weight.uniform_(-bound, bound)
            if self.conv_bias is not None:
                self.conv_bias.uniform_(-bound, bound)
            self.skip.normal_()

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (projections, short conv, filter, skip)."""
        for m in (self.in_proj, self.out_proj, self.filter):
            cast(Any, m).reset_parameters()  # every part defines reset_parameters
        self._reset_own()

    def filters(self, T: int) -> tuple[Tensor, Tensor | None]:
        """``(k, k_rev)``: causal taps ``(d, T)`` with the skip ``D`` folded into lag 0 (``D v[t]`` is the
        lag-0 tap), and for ``causal=False`` the anti-causal taps ``(d, T)``."""
        h = self.filter(T)
        k = h[: self.d] + F.pad(self.skip.unsqueeze(1), (0, T - 1))
        return (k, None) if self.causal else (k, h[self.d:])

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, T, d) -> (batch, T, d)`` for ``1 <= T <= max_len``."""
        _, T, _ = check_sequence("MonarchMixer", x, self.d, self.max_len)
        u = self.in_proj(x)  # (batch, T, 3d) = [a, g, v]
        u = short_conv(u, self.conv_weight, self.conv_bias, self.causal)  # (batch, T, 3d)
        k, k_rev = self.filters(T)  # (d, T) each
        y = gated_conv(u, k, k_rev, fft=check_fft("MonarchMixer", self.fft))  # a * (h * (g * v)): (batch, T, d)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return (f"d={self.d}, max_len={self.max_len}, causal={self.causal}, fft={self.fft!r}, "
                f"filter={self.filter_kind!r}, short_kernel={self.short_kernel}")
