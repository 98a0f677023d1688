"""``btt``: Block Tensor-Train — ``ncores`` cores, each ONE batched matmul.

Qiu, Potapczynski, Finzi, Goldblum, Wilson, "Compute Better Spent: Replacing Dense Layers with
Structured Matrices", ICML 2024. With ``d = ncores`` cores, input modes ``n_1..n_d`` (``in_factors``),
output modes ``m_1..m_d`` (``out_factors``) and TT ranks ``r_0 = r_d = 1``, ``r_1 = ... = r_{d-1} = rank``:

* the input is viewed as ``(n_1, ..., n_d)`` (row-major) and the output as ``(m_1, ..., m_d)``;
* step ``k = 1..d`` contracts input mode ``n_{d-k+1}`` and rank ``r_{k-1}``, producing output mode ``m_k``
  and rank ``r_k``, batched over the input modes ``n_1..n_{d-k}`` not yet used and the output modes
  ``m_1..m_{k-1}`` already produced;
* so core ``k`` (parameter ``core{k}``) has shape
  ``(n_1*...*n_{d-k}, m_1*...*m_{k-1}, m_k*r_k, n_{d-k+1}*r_{k-1})`` — rows ``(m_k, r_k)`` and columns
  ``(n_{d-k+1}, r_{k-1})``, row-major — and step ``k`` is one ``bmm``.

With ``d = 2`` this is the rank-``r`` generalised Monarch (``core1`` = Monarch's ``R`` with
``nblocks = n_1``, ``core2`` = its ``L`` with ``out_blocks = m_1``; Monarch reads the output as
``(m_2, m_1)`` where BTT reads ``(m_1, m_2)`` — a relabelling of output features).

**Any sizes.** ``prod(in_factors) >= in`` and ``prod(out_factors) >= out``; the input is zero-padded at the
end to ``prod(in_factors)``, the output truncated to ``out``. Defaults ``balanced_factors(in, ncores)``
and ``balanced_factors(out, ncores)`` keep that padding small. Counts: ``param_count`` is the sum of the
core sizes, ``flop_count`` twice that (each core entry is one multiply-add per row), padding included.

**Init** (per "Compute Better Spent": each core's std ``~ 1/sqrt(core fan-in)``): core ``k`` has
variance ``g / (n_{d-k+1} r_{k-1})`` with ``g**d = (1/3) * prod(in_factors) / in``, which makes the
product's output variance exactly nn.Linear's ``1/3`` on unit inputs (the rank sums and the zero padding
are both compensated). The paper's further μP factor ``min(1, sqrt(d_out/d_in))`` and per-core learning
rates are training-recipe choices left to the caller.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import low_rank_factors, set_param_
from ..core.partition import balanced_factors
from ..core.registry import register
from .dense import output_variance_scale
from .kronecker import check_factors


def _core_shapes(in_factors: tuple[int, ...], out_factors: tuple[int, ...],
                 rank: int) -> list[tuple[int, int, int, int]]:
    """Shape of core ``k = 1..d``: ``(N_k, M_k, m_k*r_k, n_{d-k+1}*r_{k-1})``."""
    d = len(in_factors)
    ranks = [1] + [rank] * (d - 1) + [1]
    shapes = []
    for k in range(1, d + 1):
        N = math.prod(in_factors[: d - k])
        M = math.prod(out_factors[: k - 1])
        shapes.append((N, M, out_factors[k - 1] * ranks[k], in_factors[d - k] * ranks[k - 1]))
    return shapes


def max_rank(in_factors: tuple[int, ...], out_factors: tuple[int, ...]) -> int:
    """The largest useful TT rank: bond ``k`` (between cores ``k`` and ``k+1``) carries, for each fixed index
    of the inputs still to come and the outputs already made, a map from the ``prod(in_factors[d-k:])``
    inputs consumed so far to the ``prod(out_factors[k:])`` outputs still to make, so a rank above
    ``min`` of the two saturates it; a uniform rank above the largest such bound saturates every bond."""
    d = len(in_factors)
    return max(min(math.prod(in_factors[d - k:]), math.prod(out_factors[k:])) for k in range(1, d))


@register
class BlockTensorTrain(StructuredLinear):
    """Block Tensor-Train with ``ncores`` cores and TT rank ``rank``; ``ncores=2`` is rank-r Monarch.

    Defaults: ``ncores = 2`` (or the length of the given factors), ``rank = 1``, balanced factors.
    """

    name = "btt"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, ncores: int | None = None,
                 rank: int = 1, in_factors: tuple[int, ...] | None = None,
                 out_factors: tuple[int, ...] | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        owner = "BlockTensorTrain"
        if ncores is None:
            given = in_factors if in_factors is not None else out_factors
            ncores = len(given) if given is not None and hasattr(given, "__len__") else 2
        self.ncores = check_int(owner, "ncores", ncores, minimum=2,
                                fix="A BTT needs at least 2 cores (ncores=2 is Monarch); for one core "
                                    "use the 'dense' structure.")
        self.rank = check_int(owner, "rank", rank, fix="Use a TT rank >= 1 (rank 1 with 2 cores is Monarch).")
        d = self.ncores
        if in_factors is None:
            in_factors = balanced_factors(in_features, d)
        if out_factors is None:
            out_factors = balanced_factors(out_features, d)
        self.in_factors = check_factors(owner, "in_factors", in_factors, in_features, d, "in_features")
        self.out_factors = check_factors(owner, "out_factors", out_factors, out_features, d, "out_features")
        top = max_rank(self.in_factors, self.out_factors)
        check_int(owner, "rank", self.rank, maximum=top,
                  fix=f"With in_factors={self.in_factors} and out_factors={self.out_factors} every TT bond is "
                      f"saturated at rank {top} (bond k carries at most min(prod(in_factors[d-k:]), "
                      f"prod(out_factors[k:])) values), so higher ranks add parameters and no "
                      f"expressiveness: use 1 <= rank <= {top}.")
        for k, shape in enumerate(_core_shapes(self.in_factors, self.out_factors, self.rank), start=1):
            # core k: (N_k, M_k, m_k*r_k, n_{d-k+1}*r_{k-1})
            self.register_parameter(f"core{k}", nn.Parameter(torch.empty(shape, **self._factory)))
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"ncores": self.ncores, "rank": self.rank, "in_factors": self.in_factors,
                "out_factors": self.out_factors}

    def cores(self) -> list[Tensor]:
        """``[core1, ..., core_d]`` in multiply order."""
        return [getattr(self, f"core{k}") for k in range(1, self.ncores + 1)]

    def _reset_structure(self) -> None:
        d = self.ncores
        pad = math.prod(self.in_factors) / self.in_features
        g = output_variance_scale(d) * pad ** (1.0 / d)
        for core in self.cores():
            init_uniform_(core, g / core.shape[-1])  # fan-in of core k = n_{d-k+1} * r_{k-1}

    # ------------------------------------------------------------------ multiplies
    def _matmul(self, x: Tensor) -> Tensor:
        n, m, d = self.in_factors, self.out_factors, self.ncores
        batch = x.shape[0]
        xp = F.pad(x, (0, math.prod(n) - self.in_features))  # (batch, n_1*...*n_d)
        h = None
        for k, core in enumerate(self.cores(), start=1):
            N, M, rows, cols = core.shape
            if h is None:  # step 1: (batch, N_1, n_d) -> (N_1, batch, n_d)
                h = xp.reshape(batch, N, cols).transpose(0, 1)
            else:  # h: (N_{k-1}*M_{k-1}, batch, m_{k-1}*r_{k-1}) laid out (N_k, n_{d-k+1}, M_{k-1}, ...)
                nk, mprev = n[d - k], m[k - 2]
                h = h.reshape(N, nk, M // mprev, batch, mprev, cols // nk)
                # contiguous: the reshape may be a view without unit-stride rows (r = 1), which CPU bmm
                # runs matrix by matrix (in the backward too)
                h = h.permute(0, 2, 4, 3, 1, 5).reshape(N * M, batch, cols).contiguous()  # (N_k*M_k, batch, n*r)
            h = torch.bmm(h, core.reshape(N * M, rows, cols).transpose(1, 2))  # (N_k*M_k, batch, m_k*r_k)
        # after step d: (M_d, batch, m_d) with output index (m_1..m_{d-1}, m_d)
        assert h is not None  # ncores >= 2: the loop ran
        y = h.transpose(0, 1).reshape(batch, math.prod(m))
        return y[:, : self.out_features]

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # every step as an explicit loop over its batch of small matrices, on the full mode tensor
        n, m, d = self.in_factors, self.out_factors, self.ncores
        batch = x.shape[0]
        S = F.pad(x, (0, math.prod(n) - self.in_features)).reshape(batch, *n, 1)  # (batch, n.., r_0=1)
        for k, core in enumerate(self.cores(), start=1):
            outs = []
            for a_flat, a in enumerate(itertools.product(*map(range, n[: d - k]))):
                for b_flat, b in enumerate(itertools.product(*map(range, m[: k - 1]))):
                    idx: tuple[slice | int, ...] = (slice(None), *a, slice(None), *b, slice(None))
                    sl = S[idx]  # (batch, n_{d-k+1}, r_{k-1})
                    outs.append(sl.reshape(batch, -1) @ core[a_flat, b_flat].T)  # (batch, m_k*r_k)
            r_k = core.shape[2] // m[k - 1]
            S = torch.stack(outs, 1).reshape(batch, *n[: d - k], *m[:k], r_k)
        return S.reshape(batch, math.prod(m))[:, : self.out_features]

    def to_dense(self) -> Tensor:
        n, m, d = self.in_factors, self.out_factors, self.ncores
        cores = self.cores()
        N1, _, rows, cols = cores[0].shape
        # T: (N_k, M_{k+1} = m_1..m_k, r_k, n_{d-k+1}..n_d)
        T = cores[0].reshape(N1, m[0], rows // m[0], cols)
        for k in range(2, d + 1):
            core = cores[k - 1]
            N, M, rows, cols = core.shape
            nk, mk = n[d - k], m[k - 1]
            C6 = core.reshape(N, M, mk, rows // mk, nk, cols // nk)  # (a, M, m_k, r_k, n, r_{k-1})
            T6 = T.reshape(N, nk, M, cols // nk, -1)  # (a, n, M, r_{k-1}, rest)
            T = torch.einsum("aMmsnr,anMrR->aMmsnR", C6, T6)  # (a, M, m_k, r_k, n, rest)
            T = T.reshape(N, M * mk, rows // mk, -1)
        W = T.reshape(math.prod(m), math.prod(n))
        return W[: self.out_features, : self.in_features]

    # ------------------------------------------------------------------ projection
    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Sequential truncated SVDs, last core first (a block TT-SVD).

        Write ``P_k`` for the product of cores ``1..k``, indexed ``(n_1..n_{d-k} | n_{d-k+1} |
        m_1..m_{k-1} | m_k, r_k | n_{d-k+2}..n_d)``; ``P_d = W`` (zero-padded). For every fixed
        ``(n_1..n_{d-k+1}, m_1..m_{k-1})`` the slice ``P_k[(m_k, r_k), (n_{d-k+2}..n_d)]`` equals
        ``core_k[(m_k, r_k), (n_{d-k+1} fixed, r_{k-1})] @ P_{k-1}[r_{k-1}, (n_{d-k+2}..n_d)]``, a rank
        ``<= rank`` product: its rank-``rank`` SVD gives core ``k`` (left factor) and ``P_{k-1}`` (right
        factor), down to ``P_1 = core1``. The cores are then rescaled to equal norms (same product).

        * ``ncores = 2``: one step, the per-slice rank-r SVD of every (output block ``m_1``, input block
          ``n_1``) ``(m_2, n_2)`` slice — the exact Frobenius projection (as Monarch; padding only
          removes whole rows/columns of a slice, so the zero-filled SVD is optimal on the true entries):
          returns True. With ``cov`` each slice is whitened by its input block's second moment ``C_aa``
          (exact when ``n_1 = 1``, otherwise a start that deftly refines: returns False).
        * ``ncores >= 3``: each step is optimal given the previous ones (quasi-optimal overall, exact on
          a matrix that is already a BTT of this rank): returns False so deftly refines it, unless every
          truncation dropped nothing (squared relative residuals summing to <= 1e-24: ``W`` already is
          such a BTT, the error is zero); with ``cov`` the plain result is the start (False).
        """
        n, m, d, r = self.in_factors, self.out_factors, self.ncores, self.rank
        W = weight.new_zeros(math.prod(m), math.prod(n))
        W[: self.out_features, : self.in_features] = weight
        cov_blocks = None
        if cov is not None and d == 2:
            n1, n2 = n
            cp = cov.new_zeros(n1 * n2, n1 * n2)
            cp[: self.in_features, : self.in_features] = cov.to(cp.device)
            # C_aa of every input block a: (n1, 1, n2, n2), broadcast over the output blocks
            cov_blocks = cp.reshape(n1, n2, n1, n2).diagonal(dim1=0, dim2=2).permute(2, 0, 1).unsqueeze(1)
        # P_d: (N_d = 1, n_1, M_d = m_1..m_{d-1}, m_d, r_d = 1, n_2..n_d)
        Md, rest = math.prod(m[: d - 1]), math.prod(n[1:])
        P = W.reshape(Md, m[d - 1], n[0], rest).permute(2, 0, 1, 3).reshape(1, n[0], Md, m[d - 1], 1, rest)
        cores: list[Tensor] = [W] * d
        residual = 0.0  # sum over steps of the squared relative truncation error
        for k in range(d, 1, -1):
            N, nk, M, mk, rk, Rk = P.shape
            X = P.reshape(N * nk, M, mk * rk, Rk)
            U, V = low_rank_factors(X, r, cov_blocks if k == d else None)  # (.., mk*rk, r), (.., r, Rk)
            if d > 2:
                size = float(X.abs().pow(2).sum())
                residual += float((X - U @ V).abs().pow(2).sum()) / size if size > 0 else 0.0
            # core k: (N, M, m_k*r_k, n_{d-k+1}*r_{k-1})
            U = U.reshape(N, nk, M, mk * rk, r).permute(0, 2, 3, 1, 4)
            cores[k - 1] = U.reshape(N, M, mk * rk, nk * r)
            # P_{k-1}: (N*nk, n_{d-k+2}, m_1..m_{k-2}, m_{k-1}, r, n_{d-k+3}..n_d)
            nn_, mp = n[d - k + 1], m[k - 2]
            P = V.reshape(N * nk, M // mp, mp, r, nn_, Rk // nn_).permute(0, 4, 1, 2, 3, 5)
        N1, nd, _, m1, r1, _ = P.shape
        cores[0] = P.permute(0, 2, 3, 4, 1, 5).reshape(N1, 1, m1 * r1, nd)
        norms = [float(c.abs().pow(2).sum().sqrt()) for c in cores]
        if min(norms) > 0:  # balance the gauge: equal norms, same product
            mean = math.exp(sum(math.log(x) for x in norms) / d)
            cores = [c * (mean / x) for c, x in zip(cores, norms)]
        for param, value in zip(self.cores(), cores):
            set_param_(param, value)
        if d == 2:
            return cov is None or n[0] == 1
        return cov is None and residual <= 1e-24  # every truncation exact: W already is such a BTT

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        """``ncores`` 2 and 3 with balanced factors and ranks ``1..32``, keeping the ranks that store no
        more than the dense ``in * out`` (rank 1 is always kept) and at most :func:`max_rank` (for 2
        cores the slice size ``min(m_2, n_2)``; beyond it every bond is saturated). At most 64 candidates."""
        dense = in_features * out_features
        cands: list[dict] = []
        shapes = [(balanced_factors(in_features, d), balanced_factors(out_features, d)) for d in (2, 3)]
        # 2 cores with a common first factor b dividing both sizes (Monarch's blocks: b = nblocks), so a
        # rectangular layer has exact 2-core shapes to fill its budget with
        g = math.gcd(in_features, out_features)
        shapes += [((b, in_features // b), (b, out_features // b)) for b in range(2, math.isqrt(g) + 1)
                   if g % b == 0 and ((b, in_features // b), (b, out_features // b)) != shapes[0]]
        for nf, mf in shapes:
            top = max_rank(nf, mf)  # for 2 cores: the slice size min(m_2, n_2)
            for r in range(1, 33):
                hp: dict[str, Any] = {"ncores": len(nf), "rank": r, "in_factors": nf, "out_factors": mf}
                if r > 1 and (r > top or cls.param_count(in_features, out_features, **hp) > dense):
                    break
                cands.append(hp)
        return cands

    # ------------------------------------------------------------------ counts
    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *, ncores: int, rank: int = 1,
                    in_factors: tuple[int, ...] = (), out_factors: tuple[int, ...] = ()) -> float:
        """Padding of the factors first, then two cores over more (a rank-r BTT of 2 cores is rank-r Monarch;
        3 cores trained worse at the same budget in the char-LM ablations), then, for 2 cores, a first
        factor near Monarch's preferred block count ``sqrt(min(in, out)) / 2``."""
        pad = ((math.prod(in_factors) - in_features) / in_features if in_factors else 0.0) + (
            (math.prod(out_factors) - out_features) / out_features if out_factors else 0.0)
        blocks = 0.0
        if ncores == 2 and in_factors:  # the first factor plays Monarch's block count
            pref = max(1.0, math.sqrt(min(in_features, out_features)) / 2)
            blocks = 0.25 * abs(math.log2(in_factors[0] / pref))
        return 10.0 * pad + (ncores - 2) + blocks

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, ncores: int, rank: int,
                    in_factors: tuple[int, ...], out_factors: tuple[int, ...]) -> int:
        return sum(math.prod(s) for s in _core_shapes(tuple(in_factors), tuple(out_factors), rank))

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, ncores: int, rank: int,
                   in_factors: tuple[int, ...], out_factors: tuple[int, ...]) -> int:
        return 2 * cls.param_count(in_features, out_features, ncores=ncores, rank=rank,
                                   in_factors=in_factors, out_factors=out_factors)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        # balanced default factors fit any sizes (the generic suite may reuse an example at another
        # size); explicit factor tuples are exercised in tests/test_btt.py
        top2 = max_rank(balanced_factors(in_features, 2), balanced_factors(out_features, 2))
        top3 = max_rank(balanced_factors(in_features, 3), balanced_factors(out_features, 3))
        out = [{"ncores": 2, "rank": 1}, {"ncores": 2, "rank": min(2, top2)}, {"ncores": 3, "rank": min(2, top3)}]
        return [hp for i, hp in enumerate(out) if hp not in out[:i]]
