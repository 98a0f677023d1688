"""Long-convolution filters: ``filter(T) -> (channels, T)`` taps for lags ``0..T-1``, any ``T <= max_len``.

* :class:`ExplicitFilter` — one free tap per channel and lag: ``channels * max_len`` parameters.
* :class:`ImplicitFilter` — Hyena's implicit parametrisation (Poli et al., ICML 2023): the taps are a
  small MLP of positional features times an exponential decay window,

      h[c, s] = MLP(z(s / max_len))[c] * exp(-a_c s / max_len),
      z(t) = [t, cos(2 pi f t), sin(2 pi f t) for f = 1..bands],  MLP = Linear -> sin -> Linear -> sin -> Linear

  with per-channel decay rates ``a_c`` spaced (log-linearly) so that the windows fall to ``1e-2`` between
  ``fast`` and ``slow`` fractions of ``max_len`` (Hyena's ``ExponentialModulation``). Its parameters do
  not depend on ``max_len`` or ``T``.

Lags are measured in absolute positions (``s / max_len``), so the filter for a shorter sequence is the
prefix of the filter for a longer one: evaluating at ``T`` and at ``max_len`` agree on the first ``T``
taps. Positional features and decay rates are recomputed from sizes on each call (no buffers), so
meta-device construction, ``to_empty`` and ``load_state_dict`` need nothing else.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["ExplicitFilter", "ImplicitFilter", "decay_rates", "positional_features"]


def _check_pos_int(owner: str, name: str, value, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name}={value} is invalid; it must be >= 1. {fix}")
    return value


def _check_T(owner: str, T, max_len: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int):
        raise TypeError(f"{owner}: T must be an int (the sequence length), got {T!r}")
    if T < 1:
        raise ValueError(f"{owner}: T={T} is invalid; the filter needs a sequence length >= 1")
    if T > max_len:
        raise ValueError(f"{owner}: T={T} exceeds max_len={max_len}; build the filter with max_len >= {T}")
    return T


def positional_features(T: int, max_len: int, bands: int, *, device=None, dtype=None) -> Tensor:
    """``(T, 1 + 2 bands)``: ``[t, cos(2 pi f t), sin(2 pi f t)]_{f=1..bands}`` at ``t = s / max_len``."""
    dtype = dtype or torch.get_default_dtype()
    t = torch.arange(T, device=device, dtype=torch.float64).unsqueeze(1) / max_len  # (T, 1)
    f = torch.arange(1, bands + 1, device=device, dtype=torch.float64)  # (bands,)
    ang = 2 * math.pi * t * f
    return torch.cat([t, torch.cos(ang), torch.sin(ang)], 1).to(dtype)


def decay_rates(channels: int, fast: float, slow: float, target: float = 1e-2, *, device=None,
                dtype=None) -> Tensor:
    """``(channels,)`` rates ``a_c``: ``exp(-a_c t)`` reaches ``target`` at ``t`` from ``fast`` to ``slow``
    (fractions of ``max_len``), geometrically spaced."""
    horizons = torch.logspace(math.log10(fast), math.log10(slow), channels, device=device, dtype=torch.float64)
    return (-math.log(target) / horizons).to(dtype or torch.get_default_dtype())


class ExplicitFilter(nn.Module):
    """``channels`` free filters of ``max_len`` taps; ``forward(T) -> weight[:, :T]``.

    Init: ``N(0, 1)`` taps under a decay window (as :class:`ImplicitFilter`), each channel scaled to unit
    energy ``sum_s h[c, s]^2 = 1`` so that a convolution keeps the input's variance.
    """

    def __init__(self, channels: int, max_len: int, *, fast: float = 0.3, slow: float = 1.5,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.channels = _check_pos_int("ExplicitFilter", "channels", channels, "Use one filter per channel.")
        self.max_len = _check_pos_int("ExplicitFilter", "max_len", max_len, "Use the longest sequence length.")
        self.fast, self.slow = float(fast), float(slow)
        self.weight = nn.Parameter(torch.empty(channels, max_len, device=device, dtype=dtype))  # (c, max_len)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.weight
        with torch.no_grad():
            w.normal_()
            t = torch.arange(self.max_len, device=w.device, dtype=w.dtype) / self.max_len
            a = decay_rates(self.channels, self.fast, self.slow, device=w.device, dtype=w.dtype)
            w.mul_(torch.exp(-a.unsqueeze(1) * t))
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, T: int) -> Tensor:
        """``(channels, T)`` taps for lags ``0..T-1``."""
        return self.weight[:, :_check_T("ExplicitFilter", T, self.max_len)]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, max_len={self.max_len}"


class _Sin(nn.Module):
    """``sin(w * x)`` with a learned frequency per feature (Hyena's ``Sin`` activation)."""

    def __init__(self, width: int, w: float, device=None, dtype=None) -> None:
        super().__init__()
        self.w0 = float(w)
        self.freq = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.freq.fill_(self.w0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter: ``channels`` filters from one small MLP, parameters independent of
    ``max_len`` (``(1 + 2 bands) * hidden + hidden^2 + hidden * channels`` weights plus biases and
    frequencies).

    Args:
        channels: number of filters (one per channel convolved).
        max_len: longest sequence; positions are ``s / max_len``.
        bands: sinusoid frequencies of the positional features (features ``1 + 2 bands``).
        hidden: MLP width; ``layers``: hidden layers (each Linear -> sin).
        w: initial frequency of the sine activations.
        fast, slow: the decay windows reach ``1e-2`` at these fractions of ``max_len``.
    """

    def __init__(self, channels: int, max_len: int, *, bands: int = 8, hidden: int = 32, layers: int = 2,
                 w: float = 1.0, fast: float = 0.3, slow: float = 1.5, device=None, dtype=None) -> None:
        super().__init__()
        owner = "ImplicitFilter"
        self.channels = _check_pos_int(owner, "channels", channels, "Use one filter per channel.")
        self.max_len = _check_pos_int(owner, "max_len", max_len, "Use the longest sequence length.")
        self.bands = _check_pos_int(owner, "bands", bands, "Use e.g. bands=8.")
        self.hidden = _check_pos_int(owner, "hidden", hidden, "Use e.g. hidden=32.")
        self.layers = _check_pos_int(owner, "layers", layers, "Use e.g. layers=2.")
        if not (0 < fast <= slow):
            raise ValueError(f"{owner}: fast={fast}, slow={slow} must satisfy 0 < fast <= slow (fractions of "
                             f"max_len where the decay windows reach 1e-2), e.g. fast=0.3, slow=1.5")
        self.fast, self.slow = float(fast), float(slow)
        fk = {"device": device, "dtype": dtype}
        mods: list[nn.Module] = []
        width = 1 + 2 * bands
        for _ in range(layers):
            mods += [nn.Linear(width, hidden, **fk), _Sin(hidden, w, **fk)]
            width = hidden
        self.mlp = nn.Sequential(*mods)
        self.out = nn.Linear(hidden, channels, bias=False, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default ``nn.Linear`` init, then the output layer scaled so that the filters at ``max_len`` have
        mean energy ``mean_c sum_s h[c, s]^2 = 1`` (variance-preserving convolution at init)."""
        for m in self.mlp:
            cast(Any, m).reset_parameters()  # the MLP's Linear layers (nn.Sequential items)
        self.out.reset_parameters()
        with torch.no_grad():
            h = self.forward(self.max_len)
            energy = h.pow(2).sum(1).mean()
            self.out.weight.mul_(energy.clamp_min(1e-12).rsqrt())

    def forward(self, T: int) -> Tensor:
        """``(channels, T)`` taps for lags ``0..T-1``."""
        T = _check_T("ImplicitFilter", T, self.max_len)
        w = self.out.weight
        z = positional_features(T, self.max_len, self.bands, device=w.device, dtype=w.dtype)  # (T, features)
        h = self.out(self.mlp(z))  # (T, channels)
        t = torch.arange(T, device=w.device, dtype=w.dtype).unsqueeze(1) / self.max_len  # (T, 1)
        a = decay_rates(self.channels, self.fast, self.slow, device=w.device, dtype=w.dtype)
        return (h * torch.exp(-t * a)).T  # (channels, T)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, max_len={self.max_len}, bands={self.bands}, hidden={self.hidden}, "
                f"layers={self.layers}")
