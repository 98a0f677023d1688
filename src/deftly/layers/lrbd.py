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

import math

import torch
from torch import Tensor

from ..core.base import StructuredLinear
from ..core.linalg import cov_sqrt, low_rank_factors, set_param_
from ..core.partition import _divisors
from ..core.registry import register
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
        # the parts are built on the meta device and initialised once, by reset_parameters below: no
        # random numbers are drawn twice, so a seeded build equals meta -> to_empty -> reset_parameters
        kw = {"device": "meta", "dtype": dtype}
        self.lowrank = LowRank(in_features, out_features, bias=False, rank=rank, **kw)
        self.blockdiag = BlockDiagonal(in_features, out_features, bias=False, nblocks=nblocks, **kw)
        target = torch.empty(0, device=device).device  # `device`, or the default device
        if target.type != "meta":
            self.lowrank.to_empty(device=target)
            self.blockdiag.to_empty(device=target)
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

    #: maximum alternating-projection rounds per starting order (stops earlier once it stalls)
    projection_rounds: int = 12
    #: stop the rounds once the relative error improves by less than this fraction
    projection_tol: float = 1e-3

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Alternating projection onto ``W - I = L + B``: ``L`` = best rank-r of ``W - I - B`` (SVD,
        whitened with ``cov``), then ``B`` = best block-diagonal of ``W - I - L`` (block extraction, or
        the per-block least squares with ``cov``); each step is an exact minimisation, so the error never
        increases. Run from both starts (low-rank first and block-diagonal first, i.e. from each single
        projection) and keep the better: the error is never above either single projection."""
        eye = torch.eye(self.out_features, self.in_features, dtype=weight.dtype, device=weight.device)
        T = weight - eye
        root = None if cov is None else cov_sqrt(cov)  # computed once for all rounds
        block_step = self.blockdiag.block_projector(cov)

        def objective(S: Tensor) -> float:  # squared error, up to a constant factor
            E = T - S
            return float(E.pow(2).sum() if root is None else (E @ root).pow(2).sum())

        best: tuple[float, Tensor | None, Tensor | None, Tensor | None] | None = None
        for first in ("lowrank", "blockdiag"):
            Ld = torch.zeros_like(T)
            Bd = torch.zeros_like(T)
            U = V = blocks = None
            prev = math.inf
            for _ in range(self.projection_rounds):
                for part in (first, "blockdiag" if first == "lowrank" else "lowrank"):
                    if part == "lowrank":
                        U, V = low_rank_factors(T - Bd, self.lowrank.rank, cov, root=root, fast=True)
                        Ld = U @ V
                    else:
                        blocks = block_step(T - Ld)
                        Bd = self.blockdiag.dense_from_blocks(blocks)
                err = objective(Ld + Bd)
                if err >= prev * (1 - 2 * self.projection_tol):
                    prev = min(err, prev)
                    break
                prev = err
            if best is None or prev < best[0]:
                best = (prev, U, V, blocks)
        assert best is not None  # two starts ran
        _, U, V, blocks = best
        assert U is not None and V is not None and blocks is not None  # projection_rounds >= 1
        set_param_(self.lowrank.U, U)
        set_param_(self.lowrank.V, V)
        set_param_(self.blockdiag.weight, blocks)
        # block coordinate descent converges linearly (L and B overlap on the diagonal blocks): deftly
        # polishes the result by L-BFGS on the same objective (never worse than this start)
        return False

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int):
        """``nblocks``: every common-enough value (up to ``2 sqrt(min)``, and divisors of ``in``/``out``);
        ``rank``: 1 up to ``min(in, out)``."""
        lim = min(in_features, out_features)
        nbs = sorted({b for b in range(1, min(lim, 2 * math.isqrt(lim) + 1) + 1)}
                     | {b for b in _divisors(in_features) + _divisors(out_features) if b <= lim})
        for nb in nbs:
            for r in range(1, lim + 1):
                yield {"rank": r, "nblocks": nb}

    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *, rank: int, nblocks: int) -> float:
        """The block-diagonal part's padding (block counts that divide both sizes first)."""
        return BlockDiagonal.shape_score(in_features, out_features, nblocks=nblocks)

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
