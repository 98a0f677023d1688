"""``lowrank``: ``W = U V`` with ``U: (out, rank)`` and ``V: (rank, in)`` (truncated-SVD form)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import low_rank_factors, set_param_
from ..core.registry import register
from ..kernels import KernelSpec, lowrank_matmul
from .dense import output_variance_scale


@register
class LowRank(StructuredLinear):
    """Rank-``rank`` factorisation: ``y = U (V x)``. Costs ``rank * (in + out)`` parameters.

    ``rank`` is at most ``min(in, out)`` (a higher rank adds parameters, not expressiveness); default
    ``min(16, in, out)``."""

    name = "lowrank"
    #: the bias fused by addmm
    kernels: ClassVar[dict[str, KernelSpec]] = {"kernel": KernelSpec(lowrank_matmul, default=True, bias=True)}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        top = min(in_features, out_features)
        if rank is None:  # default: 16, or full rank for layers narrower than that
            rank = min(16, top)
        self.rank = check_int("LowRank", "rank", rank, maximum=top,
                              fix=f"A rank above min(in_features, out_features) = {top} adds parameters and "
                                  f"no expressiveness (the product U V already has full rank {top}): use "
                                  f"1 <= rank <= {top}, or the 'dense' structure.")
        self.V = nn.Parameter(torch.empty(self.rank, in_features, **self._factory))  # (rank, in)
        self.U = nn.Parameter(torch.empty(out_features, self.rank, **self._factory))  # (out, rank)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"rank": self.rank}

    def _reset_structure(self) -> None:
        g = output_variance_scale(2)
        init_uniform_(self.V, g / self.in_features)
        init_uniform_(self.U, g / self.rank)

    def _matmul(self, x: Tensor) -> Tensor:
        return (x @ self.V.T) @ self.U.T  # (batch, rank) -> (batch, out)

    def _kernel_args(self) -> tuple:
        return self._parameters["V"], self._parameters["U"]

    def _reference_matmul(self, x: Tensor) -> Tensor:
        h = torch.stack([(x * self.V[r]).sum(-1) for r in range(self.rank)], dim=-1)  # (batch, rank)
        return torch.stack([(h * self.U[o]).sum(-1) for o in range(self.out_features)], dim=-1)

    def to_dense(self) -> Tensor:
        return self.U @ self.V

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        # Eckart-Young: truncated SVD; with calibration, the top-r left singular vectors of W C^{1/2}
        U, V = low_rank_factors(weight, self.rank, cov)
        set_param_(self.U, U)
        set_param_(self.V, V)
        return True

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        # ranks above min(in, out) add parameters and no expressiveness
        return [{"rank": r} for r in range(1, min(in_features, out_features) + 1)]

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, rank: int) -> int:
        return rank * (in_features + out_features)

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, rank: int) -> int:
        return 2 * rank * (in_features + out_features)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        return [{"rank": max(1, min(in_features, out_features) // 4)}, {"rank": 1}]
