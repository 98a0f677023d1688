"""``MixerBlock``: a pre-LayerNorm residual block — a sequence mixer, then a channel-mixing MLP whose layers
are any registered structure (Monarch by default) — and the registry of sequence mixers.

    x = x + mixer(LN(x))                      mixer: "monarch-mixer" (default) or "attention"
    x = x + W_2 gelu(W_1 LN(x))               W_1: d -> ratio d, W_2: ratio d -> d, deftly.make(structure)
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn
from torch.nn import functional as F

from ._common import LinearFactory, check_pos_int, linear_factory
from .attention import Attention
from .conv import check_sequence
from .mixer import MonarchMixer

__all__ = ["MIXERS", "MixerBlock", "make_mixer", "mixer_names"]

#: name -> class; every class takes ``(d, max_len, causal, **kwargs)`` and maps (batch, T, d) -> (batch, T, d)
MIXERS: dict[str, type[nn.Module]] = {"monarch-mixer": MonarchMixer, "attention": Attention}


def mixer_names() -> list[str]:
    """The registered sequence mixers."""
    return sorted(MIXERS)


def make_mixer(name: str, d: int, max_len: int, causal: bool = True, **kwargs: Any) -> nn.Module:
    """Build the sequence mixer ``name`` (:func:`mixer_names`); unknown names list the choices."""
    if name not in MIXERS:
        import difflib

        close = difflib.get_close_matches(str(name), MIXERS, n=1)
        raise ValueError(f"unknown sequence mixer {name!r}; choose one of: {', '.join(mixer_names())}"
                         + (f". Did you mean {close[0]!r}?" if close else ""))
    return MIXERS[name](d, max_len, causal, **kwargs)


class MixerBlock(nn.Module):
    """Residual block: sequence mixer + MLP, ``(batch, T, d) -> (batch, T, d)``.

    Args:
        d, max_len, causal: as the mixer.
        mixer: ``"monarch-mixer"`` or ``"attention"``; ``mixer_kwargs`` go to it (e.g. ``fft="monarch"``).
        structure, structure_kwargs, linear: the MLP's layers (and, unless ``mixer_kwargs`` says otherwise,
            the mixer's projections): ``deftly.make(structure, ...)``, Monarch by default.
        mlp_ratio: hidden width of the MLP in multiples of ``d``.
    """

    def __init__(self, d: int, max_len: int, causal: bool = True, *, mixer: str = "monarch-mixer",
                 mixer_kwargs: dict | None = None, structure: str = "monarch", structure_kwargs: dict | None = None,
                 linear: LinearFactory | None = None, mlp_ratio: int = 4, bias: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        self.d = check_pos_int("MixerBlock", "d", d, "d is the model width.")
        self.max_len = max_len
        ratio = check_pos_int("MixerBlock", "mlp_ratio", mlp_ratio, "Use e.g. mlp_ratio=4.")
        fk = {"device": device, "dtype": dtype}
        mk = {"structure": structure, "structure_kwargs": structure_kwargs, "linear": linear, "bias": bias, **fk}
        mk.update(mixer_kwargs or {})
        self.ln1 = nn.LayerNorm(d, **fk)
        self.mixer = make_mixer(mixer, d, max_len, causal, **mk)
        self.ln2 = nn.LayerNorm(d, **fk)
        make = linear_factory("MixerBlock", structure, structure_kwargs, linear, bias, device, dtype)
        self.fc1 = make(d, ratio * d)
        self.fc2 = make(ratio * d, d)

    def reset_parameters(self) -> None:
        for m in (self.ln1, self.mixer, self.ln2, self.fc1, self.fc2):
            cast(Any, m).reset_parameters()  # every part defines reset_parameters

    def forward(self, x: Tensor) -> Tensor:
        check_sequence("MixerBlock", x, self.d, self.max_len)
        x = x + self.mixer(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
