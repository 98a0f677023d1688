"""``lrbd``: low-rank + block-diagonal + identity residual, ``y = L x + B x + x``.

The low-rank term carries the global, smooth part of a weight (as in the truncated SVD), the
block-diagonal term the local part, and the identity keeps the layer near the identity map, as a
residual connection does (cf. Pixelated Butterfly = sparse + low-rank, Chen, Dao et al. ICLR 2022, and
the robust-PCA "low-rank plus sparse" split).

**Rectangular residual.** For ``in != out`` the residual is the rectangular identity ``I[out, in]``
(ones on the main diagonal ``W[i, i]``, ``i < min(in, out)``): a tall layer copies the input into its
first ``in`` outputs and the rest start at zero; a wide layer keeps the first ``out`` inputs. The
residual is fixed (not a parameter); ``to_dense()`` includes it, ``fixed_residual(x)`` returns it alone.

**Init.** ``L`` and ``B`` share nn.Linear's output variance (1/6 each), so the *learned* part has the
variance of a dense layer; the identity adds the input on top, as any residual block does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import StructuredLinear, init_uniform_
from ..registry import register
from .blockdiag import BlockDiagonal
from .lowrank import LowRank


@register
class LowRankBlockDiagIdentity(StructuredLinear):
    """``y = U V x + blockdiag(x) + I x (+ b)``; params ``rank*(in+out) + in*out/nblocks``."""

    name = "lrbd"
    has_fixed_residual = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 nblocks: int = 4, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        kw = {"device": device, "dtype": dtype}
        self.lowrank = LowRank(in_features, out_features, bias=False, rank=rank, **kw)
        self.blockdiag = BlockDiagonal(in_features, out_features, bias=False, nblocks=nblocks, **kw)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"rank": self.lowrank.rank, "nblocks": self.blockdiag.nblocks}

    def _reset_structure(self) -> None:
        self.lowrank.reset_parameters()
        self.blockdiag.reset_parameters()
        with torch.no_grad():  # each part carries half of nn.Linear's output variance
            self.lowrank.U.mul_(0.5 ** 0.5)
            self.blockdiag.weight.mul_(0.5 ** 0.5)

    def fixed_residual(self, x: Tensor) -> Tensor:
        n = min(self.in_features, self.out_features)
        if self.out_features <= self.in_features:
            return x[..., :n]
        return torch.nn.functional.pad(x, (0, self.out_features - n))

    def _matmul(self, x: Tensor) -> Tensor:
        return self.lowrank._matmul(x) + self.blockdiag._matmul(x) + self.fixed_residual(x)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return (self.lowrank._reference_matmul(x) + self.blockdiag._reference_matmul(x)
                + self.fixed_residual(x))

    def to_dense(self) -> Tensor:
        eye = torch.eye(self.out_features, self.in_features, dtype=self.lowrank.U.dtype,
                        device=self.lowrank.U.device)
        return self.lowrank.to_dense() + self.blockdiag.to_dense() + eye

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, rank: int, nblocks: int) -> int:
        return (LowRank.param_count(in_features, out_features, rank=rank)
                + BlockDiagonal.param_count(in_features, out_features, nblocks=nblocks))

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, rank: int, nblocks: int) -> int:
        # the identity residual is an add, not a multiply-add: not counted (like the bias)
        return (LowRank.flop_count(in_features, out_features, rank=rank)
                + BlockDiagonal.flop_count(in_features, out_features, nblocks=nblocks))

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        lim = min(in_features, out_features)
        return [{"rank": max(1, lim // 8), "nblocks": min(4, lim)}, {"rank": 1, "nblocks": lim}]

    @classmethod
    def bad_examples(cls) -> list[dict]:
        return [{"rank": 0}, {"nblocks": 0}, {"nblocks": 17}]
