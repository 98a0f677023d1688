"""``monarch``: ``M = P^T L P R`` — two block-diagonal factors around the reshape-transpose permutation.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022
(arXiv 2204.00595), in its general rectangular form with any number of blocks and per-block rank r
(rank-r Monarch = 2-core Block Tensor-Train, Qiu et al. ICML 2024):

* the input ``(in,)`` is split into ``k = nblocks`` contiguous blocks of (padded) size ``p``;
* ``R: (k, l*r, p)`` — block ``i`` maps its ``p`` inputs to ``l*r`` features, viewed as ``(l, r)``;
* the permutation ``P`` regroups ``(k, l, r) -> (l, k, r)``: output block ``j`` sees ``r`` features of
  every input block;
* ``L: (l, s, k*r)`` — block ``j`` maps those ``k*r`` features to ``s`` outputs;
* the final ``P^T`` reads ``L``'s output ``(l, s)`` as ``(s, l)``: output index ``s' * l + j``.

So ``W[s'*l + j, (i, p')] = sum_t L[j, s', i*r + t] * R[i, j*r + t, p']``: every (output block j,
input block i) slice of ``W`` has rank <= r — the fact behind the closed-form projection. The multiply
is two ``bmm``s; both permutations are folded into the layout copies that ``bmm`` needs anyway.
"""

from __future__ import annotations

import math
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import low_rank_factors, set_param_
from ..core.partition import Partition, _divisors, balanced_factors, ceil_div
from ..core.registry import register
from ..kernels import KernelSpec, monarch_matmul, monarch_matmul_triton, triton_usable
from .dense import output_variance_scale


@register
class Monarch(StructuredLinear):
    """Monarch matrix with ``nblocks`` input blocks, ``out_blocks`` output blocks and block rank ``rank``.

    Parameters: ``nblocks * out_blocks * rank * (p + s)`` with ``p = ceil(in / nblocks)`` and
    ``s = ceil(out / out_blocks)`` — about ``2 * rank * n**1.5`` for ``n x n`` with ``sqrt(n)`` blocks.
    Defaults: ``nblocks`` near ``sqrt(in)``, ``out_blocks = min(nblocks, out)``, ``rank = 1``.
    """

    name = "monarch"
    kernels: ClassVar[dict[str, KernelSpec]] = {
        "kernel": KernelSpec(monarch_matmul, default=True, bias=True),
        "triton": KernelSpec(monarch_matmul_triton, available=triton_usable, compile_ok=False),
    }

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, nblocks: int | None = None,
                 out_blocks: int | None = None, rank: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if nblocks is None:
            nblocks = balanced_factors(in_features, 2)[1]
        self.nblocks = check_int("Monarch", "nblocks", nblocks, maximum=in_features,
                                 fix=f"Each input block needs at least one feature: use 1 <= nblocks <= "
                                     f"in_features = {in_features}.")
        if out_blocks is None:
            out_blocks = min(self.nblocks, out_features)
        self.out_blocks = check_int("Monarch", "out_blocks", out_blocks, maximum=out_features,
                                    fix=f"Use 1 <= out_blocks <= out_features = {out_features}.")
        self.in_part = Partition(in_features, self.nblocks)
        self.block_out = ceil_div(out_features, self.out_blocks)  # s
        top = min(self.in_part.block, self.block_out)
        self.rank = check_int("Monarch", "rank", rank, maximum=top,
                              fix=f"Each (output block, input block) slice is {self.block_out} x "
                                  f"{self.in_part.block}, so a rank above {top} adds parameters and no "
                                  f"expressiveness: use 1 <= rank <= {top} (rank 1 is classic Monarch), or "
                                  f"fewer blocks.")
        k, l, r = self.nblocks, self.out_blocks, self.rank
        self.R = nn.Parameter(torch.empty(k, l * r, self.in_part.block, **self._factory))  # (k, l*r, p)
        self.L = nn.Parameter(torch.empty(l, self.block_out, k * r, **self._factory))  # (l, s, k*r)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"nblocks": self.nblocks, "out_blocks": self.out_blocks, "rank": self.rank}

    def _reset_structure(self) -> None:
        g = output_variance_scale(2)
        init_uniform_(self.R, g / (self.in_features / self.nblocks))  # true fan-in of a block
        init_uniform_(self.L, g / (self.nblocks * self.rank))

    def _matmul(self, x: Tensor) -> Tensor:
        k, l, r, s = self.nblocks, self.out_blocks, self.rank, self.block_out
        batch = x.shape[0]
        xb = self.in_part.pad(x).reshape(batch, k, self.in_part.block).transpose(0, 1)  # (k, batch, p)
        h = torch.bmm(xb, self.R.transpose(1, 2))  # (k, batch, l*r)
        # P: (l, batch, k*r); contiguous: for r = 1 the reshape is a view whose rows are not unit-stride,
        # and CPU bmm then loops matrix by matrix (measured 10-20x slower at batch 1-4)
        h = h.reshape(k, batch, l, r).permute(2, 1, 0, 3).reshape(l, batch, k * r).contiguous()
        y = torch.bmm(h, self.L.transpose(1, 2))  # (l, batch, s)
        y = y.permute(1, 2, 0).reshape(batch, s * l)  # P^T: (batch, s, l)
        return y[:, : self.out_features]

    def _kernel_args(self) -> tuple:
        p, part = self._parameters, cast(Partition, self._modules["in_part"])
        return (p["R"], p["L"], self.rank, self.out_features, None if part.exact else part.gather_index)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        k, l, r, s = self.nblocks, self.out_blocks, self.rank, self.block_out
        xp = self.in_part.pad(x)
        p = self.in_part.block
        y = x.new_zeros(x.shape[0], s, l)  # output index s' * l + j
        for j in range(l):
            for i in range(k):
                # rank-r slice (j, i): L[j][:, i-part] @ R[i][j-part]
                u = xp[:, i * p:(i + 1) * p] @ self.R[i, j * r:(j + 1) * r].T  # (batch, r)
                out_j = u @ self.L[j, :, i * r:(i + 1) * r].T  # (batch, s)
                y[:, :, j] += out_j
        return y.reshape(x.shape[0], s * l)[:, : self.out_features]

    def to_dense(self) -> Tensor:
        k, l, r, s = self.nblocks, self.out_blocks, self.rank, self.block_out
        L4 = self.L.reshape(l, s, k, r)  # (j, s', i, t)
        R4 = self.R.reshape(k, l, r, -1)  # (i, j, t, p')
        W = torch.einsum("jsit,ijtp->sjip", L4, R4).reshape(s * l, k * self.in_part.block)
        return W[: self.out_features].index_select(1, self.in_part.real_index)

    def _slices(self, weight: Tensor) -> Tensor:
        """``weight (out, in)`` as its (output block j, input block i) slices ``(l, k, s, p)``: slice
        ``[j, i]`` holds the outputs ``s' * l + j`` and the (padded) inputs of block ``i``."""
        k, l, s, p = self.nblocks, self.out_blocks, self.block_out, self.in_part.block
        pad = weight.new_zeros(s * l, k * p)
        pad[: self.out_features].index_copy_(1, self.in_part.real_index.to(weight.device), weight)
        return pad.reshape(s, l, k, p).permute(1, 2, 0, 3)

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Rank-r SVD of every (output-block, input-block) slice: exact Frobenius projection (the slices
        are independent and each has rank <= r in a Monarch matrix). With ``cov`` each slice is whitened
        by its own input block's second moment ``C_ii`` (the block-diagonal part of ``C``): exact when
        the input blocks are uncorrelated, otherwise a starting point that deftly refines (returns False).
        """
        k, l, r, s, p = self.nblocks, self.out_blocks, self.rank, self.block_out, self.in_part.block
        M = self._slices(weight)  # (l, k, s, p)
        cov_blocks = None
        if cov is not None:
            idx = self.in_part.real_index.to(weight.device)
            cpad = cov.new_zeros(k * p, k * p)
            cpad[idx.unsqueeze(1), idx.unsqueeze(0)] = cov
            cov_blocks = cpad.reshape(k, p, k, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (k, p, p)
            cov_blocks = cov_blocks.unsqueeze(0)  # broadcast over output blocks j
        A, B = low_rank_factors(M, r, cov_blocks)  # (l, k, s, r), (l, k, r, p)
        set_param_(self.L, A.permute(0, 2, 1, 3).reshape(l, s, k * r))  # L[j, s', i*r + t]
        set_param_(self.R, B.permute(1, 0, 2, 3).reshape(k, l * r, p))  # R[i, j*r + t, p']
        return cov is None or k == 1

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int):
        """``nblocks``: every divisor of ``in`` and every value up to ``2 sqrt(in)``, from 2 (``nblocks=1``
        is a plain low-rank matrix: use ``lowrank``, or fix ``nblocks=1`` explicitly); ``out_blocks``:
        ``min(nblocks, out)`` and the value giving square-ish blocks (``nblocks * out / in``); ``rank``:
        1 up to the slice size ``min(p, s)`` (beyond it the slices are dense). Ordered from the classic
        ``nblocks ~ sqrt(in)`` outwards, so equal counts resolve to the classic shape."""
        if in_features < 2:
            yield {"nblocks": 1, "out_blocks": 1, "rank": 1}
            return
        ks = {k for k in range(2, min(in_features, 2 * math.isqrt(in_features)) + 1)} | \
            {k for k in _divisors(in_features) if k >= 2}
        classic = balanced_factors(in_features, 2)[1]
        for k in sorted(ks, key=lambda k: (abs(math.log(k / classic)), k)):
            p = ceil_div(in_features, k)
            ls = sorted({min(k, out_features), max(1, min(out_features, round(k * out_features / in_features)))})
            for l in ls:
                s = ceil_div(out_features, l)
                for r in range(1, min(p, s) + 1):
                    yield {"nblocks": k, "out_blocks": l, "rank": r}

    #: preferred number of blocks per factor: sqrt(min(in, out)) (16 at 256, 32 at 1024), the count the
    #: ablations on two GPTs trained best with at 25% (docs/defaults.md); the budget is then met by the rank
    @classmethod
    def preferred_blocks(cls, in_features: int, out_features: int) -> float:
        # sqrt(n) blocks of sqrt(n), the published parametrisation; measured (benchmarks/transformer_ablation.py):
        # d=256, 1500 steps: 16 blocks -0.35% vs dense, 8 blocks +0.97%; d=192: 12 blocks +1.8%, 6 blocks +3.8%
        return max(1.0, math.sqrt(min(in_features, out_features)))

    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *, nblocks: int, out_blocks: int,
                    rank: int = 1) -> float:
        """Padding (blocks that do not divide the sizes) first, then unequal block counts on the two sides,
        then the distance of ``nblocks`` from :meth:`preferred_blocks` (log scale)."""
        pad = (nblocks * ceil_div(in_features, nblocks) - in_features) / in_features + (
            out_blocks * ceil_div(out_features, out_blocks) - out_features) / out_features
        return 10.0 * pad + abs(math.log(nblocks / out_blocks)) + 0.25 * abs(
            math.log2(nblocks / cls.preferred_blocks(in_features, out_features)))

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, nblocks: int, out_blocks: int,
                    rank: int) -> int:
        p, s = ceil_div(in_features, nblocks), ceil_div(out_features, out_blocks)
        return nblocks * out_blocks * rank * (p + s)

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, nblocks: int, out_blocks: int,
                   rank: int) -> int:
        return 2 * cls.param_count(in_features, out_features, nblocks=nblocks, out_blocks=out_blocks,
                                   rank=rank)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        k = balanced_factors(in_features, 2)[1]
        l = min(k, out_features)
        k2, l2 = min(3, in_features), min(2, out_features)
        top = min(ceil_div(in_features, k2), ceil_div(out_features, l2))  # the slice size caps the rank
        return [{"nblocks": k, "out_blocks": l, "rank": 1},
                {"nblocks": k2, "out_blocks": l2, "rank": min(2, top)}]
