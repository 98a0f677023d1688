"""``Attention``: multi-head softmax self-attention with the mixers' call shape, the baseline the long
convolution replaces: ``(batch, T, d) -> (batch, T, d)``, ``O(T^2 d)`` time, by
``F.scaled_dot_product_attention`` (on CPU a flash-style kernel, ``O(T)`` extra memory)."""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn
from torch.nn import functional as F

from ._common import LinearFactory, check_pos_int, linear_factory
from .conv import check_sequence

__all__ = ["Attention"]


class Attention(nn.Module):
    """``proj(SDPA(q, k, v))`` with ``[q, k, v] = qkv(x)``; ``heads`` heads of width ``d / heads``.

    Args:
        d, max_len, causal: as :class:`~deftly.mixers.MonarchMixer` (``max_len`` only bounds ``T``).
        heads: attention heads (must divide ``d``).
        structure, structure_kwargs, linear, bias, device, dtype: the ``qkv`` (d -> 3d) and ``proj``
            (d -> d) projections, dense by default.
    """

    def __init__(self, d: int, max_len: int, causal: bool = True, *, heads: int = 4, structure: str = "dense",
                 structure_kwargs: dict | None = None, linear: LinearFactory | None = None, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        owner = "Attention"
        self.d = check_pos_int(owner, "d", d, "d is the model width (channels).")
        self.max_len = check_pos_int(owner, "max_len", max_len, "max_len is the longest sequence length.")
        self.heads = check_pos_int(owner, "heads", heads, "Use e.g. heads=4.")
        if d % heads:
            raise ValueError(f"{owner}: d={d} is not divisible by heads={heads}; use a divisor of d, e.g. "
                             f"heads={next(h for h in (8, 4, 2, 1) if d % h == 0)}")
        if not isinstance(causal, bool):
            raise TypeError(f"{owner}: causal={causal!r} must be True (decoder) or False (encoder)")
        self.causal = causal
        make = linear_factory(owner, structure, structure_kwargs, linear, bias, device, dtype)
        self.qkv = make(d, 3 * d)
        self.proj = make(d, d)

    def reset_parameters(self) -> None:
        cast(Any, self.qkv).reset_parameters()  # nn.Linear or a structured layer
        cast(Any, self.proj).reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, T, d) -> (batch, T, d)``."""
        b, t, d = check_sequence("Attention", x, self.d, self.max_len)
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (b, heads, t, d / heads)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))

    def extra_repr(self) -> str:
        return f"d={self.d}, max_len={self.max_len}, causal={self.causal}, heads={self.heads}"
