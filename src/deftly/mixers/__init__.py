"""Sub-quadratic sequence mixing: long convolutions by FFT as a drop-in for attention.

* :func:`causal_conv` / :func:`bidirectional_conv` — ``y = k * x`` along the sequence of ``x: (batch, T, d)``
  for any ``T``, zero-padded so the FFT's circular convolution is the linear one (exactly causal), by
  ``torch.fft`` (``fft="torch"``, default), the FFT written as Monarch matmuls (``"monarch"``) or deftly's
  sparse DFT factors (``"butterfly"``); :func:`direct_causal_conv` is the ``O(T^2)`` reference.
* :class:`ImplicitFilter` (Hyena: MLP of positions x decay, parameters independent of ``T``) and
  :class:`ExplicitFilter`.
* :class:`MonarchMixer` — gated order-2 Hyena / Monarch Mixer sequence mixer with structured projections,
  ``(batch, T, d) -> (batch, T, d)``, causal or bidirectional; :class:`Attention` — the SDPA baseline with
  the same call shape; :class:`MixerBlock` — either one plus a structured MLP in a residual block.

>>> import torch, deftly.mixers as M
>>> y = M.causal_conv(torch.randn(2, 1000, 8), torch.randn(8, 1000))         # (2, 1000, 8)
>>> mixer = M.MonarchMixer(256, max_len=4096)                                 # Monarch projections
>>> mixer(torch.randn(2, 3000, 256)).shape
torch.Size([2, 3000, 256])

See docs/mixers.md for the equations, the measured scaling and how to put it into a model.
"""

from .attention import Attention
from .block import MIXERS, MixerBlock, make_mixer, mixer_names
from .conv import (
    bidirectional_conv,
    causal_conv,
    check_sequence,
    combined_filter,
    conv_tokens,
    direct_bidirectional_conv,
    direct_causal_conv,
    gated_conv,
    gated_conv_reference,
    long_conv,
)
from .fft import FFT_PATHS, fft_length, monarch_factors, monarch_fft, monarch_frequencies, monarch_ifft
from .filters import ExplicitFilter, ImplicitFilter
from .mixer import FILTERS, MonarchMixer, short_conv, short_conv_reference

__all__ = [
    "FFT_PATHS",
    "FILTERS",
    "MIXERS",
    "Attention",
    "ExplicitFilter",
    "ImplicitFilter",
    "MixerBlock",
    "MonarchMixer",
    "bidirectional_conv",
    "causal_conv",
    "check_sequence",
    "combined_filter",
    "conv_tokens",
    "direct_bidirectional_conv",
    "direct_causal_conv",
    "fft_length",
    "gated_conv",
    "gated_conv_reference",
    "long_conv",
    "make_mixer",
    "mixer_names",
    "monarch_factors",
    "monarch_fft",
    "monarch_frequencies",
    "monarch_ifft",
    "short_conv",
    "short_conv_reference",
]
