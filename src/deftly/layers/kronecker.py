"""``kronecker``: ``W = sum_r A_r (x) B_r``, a sum of ``rank`` Kronecker products, as two matmuls.

Kronecker-factored weights: Van Loan & Pitsianis, "Approximation with Kronecker Products" (1993) for the
nearest-Kronecker-product projection; as a linear layer in Qiu et al., "Compute Better Spent: Replacing
Dense Layers with Structured Matrices", ICML 2024. ``A_r: (o1, i1)``, ``B_r: (o2, i2)``:

    (A (x) B)[a*o2 + b, c*i2 + d] = A[a, c] * B[b, d]

so with the input viewed as ``X: (batch, i1, i2)`` the product is ``Y = A X B^T`` of shape
``(batch, o1, o2)``, flattened row-major.

**Any sizes.** The factors need ``i1*i2 >= in`` and ``o1*o2 >= out``: the input is zero-padded at the end
to ``i1*i2`` and the output truncated to ``out``, so the layer's weight is the top-left ``(out, in)``
corner of ``sum_r kron(A_r, B_r)``. Defaults: ``balanced_factors(in, 2)`` and ``balanced_factors(out, 2)``
(smallest padding near ``sqrt``), ``rank = 1``.

**Multiply.** Both contraction orders are two matmuls (all ranks at once):
``B`` first costs ``2*r*i1*o2*(i2 + o1)`` FLOPs per row, ``A`` first ``2*r*i2*o1*(i1 + o2)``; the layer
uses the cheaper (``B`` first on ties) and ``flop_count`` counts exactly that, padding included.

**Init.** Output variance of a rank-r sum is ``r * in * var(A) * var(B)``; ``var(A) = g/i1`` and
``var(B) = g/(r*i2)`` with ``g = sqrt(i1*i2 / (3*in))`` give nn.Linear's ``1/3`` (the ``i1*i2/in`` factor
undoes the zero padding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import low_rank_factors, set_param_
from ..core.partition import balanced_factors
from ..core.registry import register


def check_factors(owner: str, name: str, value: Any, n: int, count: int, side: str) -> tuple[int, ...]:
    """Validate a tuple of ``count`` positive int factors whose product is at least ``n``."""
    default = balanced_factors(n, count)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{owner}: {name}={value!r} must be a tuple of {count} ints, e.g. {name}={default}")
    value = tuple(value)
    if len(value) != count:
        raise ValueError(f"{owner}: {name}={value} has {len(value)} factors but {count} are needed; "
                         f"pass {count} factors, e.g. {name}={default}")
    out = tuple(check_int(owner, f"{name}[{t}]", v, fix=f"Every factor of {name} must be >= 1.")
                for t, v in enumerate(value))
    prod = math.prod(out)
    if prod < n:
        raise ValueError(f"{owner}: {name}={out} has product {prod} < {side}={n}; the factors must "
                         f"cover all {n} features (padding fills any excess), e.g. {name}={default}")
    return out


def _masked_als(R: Tensor, free: Tensor, U: Tensor, V: Tensor, *,
                flop_budget: float = 2e9) -> tuple[Tensor, Tensor, bool]:
    """Improve ``U (m, r) V (r, n)`` as a fit of ``R`` on the entries where ``free`` is False.

    Alternating least squares: each row of ``U`` (then each column of ``V``) is the least-squares fit
    of its observed entries (pseudo-inverse of the ``r x r`` normal matrix, built from the observed
    entries only; rows/columns with no free entry share one). Every half-sweep can only lower the
    error; stops at zero error, when a sweep gains under 1e-6 of the error, or after about
    ``flop_budget`` FLOPs. Returns ``U``, ``V`` (column norms balanced) and whether the error on the
    observed entries is zero (squared relative error <= 1e-28).
    """
    obs = ~free
    Robs = R.masked_fill(free, 0)
    rows = free.any(1).nonzero().squeeze(1)
    cols = free.any(0).nonzero().squeeze(1)
    obs_rows = obs[rows].to(R.dtype)  # (|rows|, n)
    obs_cols = obs[:, cols].to(R.dtype)  # (m, |cols|)
    m, n = R.shape
    r = U.shape[1]

    def sq_err(U: Tensor, V: Tensor) -> float:
        return float((R - U @ V).masked_fill(free, 0).abs().pow(2).sum())

    total = float(Robs.abs().pow(2).sum())
    err = sq_err(U, V)
    per_sweep = 2.0 * (rows.numel() * n + m * cols.numel()) * r * r + 8.0 * m * n * r + 1.0
    for _ in range(int(min(300, max(5, flop_budget / per_sweep)))):
        if err <= 1e-28 * total:
            break
        B = Robs @ V.mH  # (m, r)
        U2 = B @ torch.linalg.pinv(V @ V.mH, hermitian=True)
        if rows.numel():
            G = torch.einsum("ij,tj,sj->its", obs_rows, V, V.conj())  # observed normal matrices
            U2[rows] = (B[rows].unsqueeze(1) @ torch.linalg.pinv(G, hermitian=True)).squeeze(1)
        C = U2.mH @ Robs  # (r, n)
        V2 = torch.linalg.pinv(U2.mH @ U2, hermitian=True) @ C
        if cols.numel():
            H = torch.einsum("ij,it,is->jts", obs_cols, U2.conj(), U2)
            V2[:, cols] = (torch.linalg.pinv(H, hermitian=True) @ C[:, cols].mT.unsqueeze(-1)).squeeze(-1).mT
        err2 = sq_err(U2, V2)
        if not err2 < err:
            break
        U, V, gain, err = U2, V2, err - err2, err2
        if gain <= 1e-6 * err:
            break
    nu = U.abs().pow(2).sum(0).sqrt()
    nv = V.abs().pow(2).sum(1).sqrt()
    scale = torch.where((nu > 0) & (nv > 0), (nv / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    return U * scale, V / scale.unsqueeze(1), err <= 1e-28 * total


@register
class Kronecker(StructuredLinear):
    """``sum_r A_r (x) B_r`` with ``A_r: (o1, i1)``, ``B_r: (o2, i2)``; ``rank*(o1*i1 + o2*i2)`` params."""

    name = "kronecker"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 in_factors: tuple[int, ...] | None = None, out_factors: tuple[int, ...] | None = None,
                 rank: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if in_factors is None:
            in_factors = balanced_factors(in_features, 2)
        if out_factors is None:
            out_factors = balanced_factors(out_features, 2)
        self.in_factors = check_factors("Kronecker", "in_factors", in_factors, in_features, 2, "in_features")
        self.out_factors = check_factors("Kronecker", "out_factors", out_factors, out_features, 2,
                                         "out_features")
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        top = min(o1 * i1, o2 * i2)  # the rank of the rearranged weight R(W): (o1 i1) x (o2 i2)
        self.rank = check_int("Kronecker", "rank", rank, maximum=top,
                              fix=f"A sum of Kronecker products A_r (x) B_r with A_r: {o1} x {i1} and B_r: "
                                  f"{o2} x {i2} reaches every matrix at rank min({o1 * i1}, {o2 * i2}) = "
                                  f"{top}; higher ranks add parameters and no expressiveness. Use 1 <= rank "
                                  f"<= {top} (rank 1 is a single A (x) B).")
        r = self.rank
        self.A = nn.Parameter(torch.empty(r, o1, i1, **self._factory))  # (rank, o1, i1)
        self.B = nn.Parameter(torch.empty(r, o2, i2, **self._factory))  # (rank, o2, i2)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"in_factors": self.in_factors, "out_factors": self.out_factors, "rank": self.rank}

    @staticmethod
    def _b_first(in_factors: tuple[int, ...], out_factors: tuple[int, ...]) -> bool:
        (i1, i2), (o1, o2) = in_factors, out_factors
        return i1 * o2 * (i2 + o1) <= i2 * o1 * (i1 + o2)

    def _reset_structure(self) -> None:
        (i1, i2), r = self.in_factors, self.rank
        g = math.sqrt(i1 * i2 / (3.0 * self.in_features))
        init_uniform_(self.A, g / i1)
        init_uniform_(self.B, g / (r * i2))

    # ------------------------------------------------------------------ multiplies
    def _matmul(self, x: Tensor) -> Tensor:
        (i1, i2), (o1, o2), r = self.in_factors, self.out_factors, self.rank
        batch = x.shape[0]
        xp = F.pad(x, (0, i1 * i2 - self.in_features))  # (batch, i1*i2), zero padding at the end
        if self._b_first(self.in_factors, self.out_factors):
            Bcat = self.B.permute(2, 0, 1).reshape(i2, r * o2)  # (i2, r*o2)
            z = xp.reshape(batch * i1, i2) @ Bcat  # (batch*i1, r*o2) = X B_r^T for all r
            z = z.reshape(batch, i1, r, o2).permute(0, 3, 2, 1).reshape(batch * o2, r * i1)  # (b o2, r i1)
            Acat = self.A.permute(1, 0, 2).reshape(o1, r * i1)  # (o1, r*i1)
            y = (z @ Acat.T).reshape(batch, o2, o1).transpose(1, 2)  # (batch, o1, o2)
        else:
            Acat = self.A.permute(2, 0, 1).reshape(i1, r * o1)  # (i1, r*o1)
            xt = xp.reshape(batch, i1, i2).transpose(1, 2).reshape(batch * i2, i1)  # (batch*i2, i1)
            z = (xt @ Acat).reshape(batch, i2, r, o1)  # A_r X, transposed
            z = z.permute(0, 3, 2, 1).reshape(batch * o1, r * i2)  # (batch*o1, r*i2)
            Bcat = self.B.permute(1, 0, 2).reshape(o2, r * i2)  # (o2, r*i2)
            y = (z @ Bcat.T).reshape(batch, o1, o2)  # (batch, o1, o2)
        return y.reshape(batch, o1 * o2)[:, : self.out_features]

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # y[a*o2 : (a+1)*o2] = sum_r sum_c A_r[a, c] * B_r @ x[c*i2 : (c+1)*i2], block by block
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        n_in, batch = self.in_features, x.shape[0]
        blocks = []
        for a in range(o1):
            acc = x.new_zeros(batch, o2)
            for c in range(i1):
                c0, c1 = c * i2, min((c + 1) * i2, n_in)
                if c0 >= n_in:
                    break
                for r in range(self.rank):
                    acc = acc + self.A[r, a, c] * (x[:, c0:c1] @ self.B[r, :, : c1 - c0].T)
            blocks.append(acc)
        return torch.cat(blocks, dim=-1)[:, : self.out_features]

    def to_dense(self) -> Tensor:
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        W = torch.einsum("rac,rbd->abcd", self.A, self.B).reshape(o1 * o2, i1 * i2)
        return W[: self.out_features, : self.in_features]

    # ------------------------------------------------------------------ projection
    def _rearrange(self, weight: Tensor) -> Tensor:
        """Van Loan–Pitsianis rearrangement ``R(W)``: ``(o1*i1, o2*i2)`` with
        ``R[a*i1 + c, b*i2 + d] = W[a*o2 + b, c*i2 + d]`` (``W`` zero-padded to ``(o1*o2, i1*i2)``), so
        ``R(A (x) B) = vec(A) vec(B)^T`` and ``||W - sum_r A_r (x) B_r||_F = ||R(W) - sum_r vec(A_r)
        vec(B_r)^T||_F``."""
        (i1, i2), (o1, o2) = self.in_factors, self.out_factors
        padded = weight.new_zeros(o1 * o2, i1 * i2)
        padded[: self.out_features, : self.in_features] = weight
        return padded.reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Nearest sum of ``rank`` Kronecker products (Van Loan & Pitsianis 1993): the rank-``rank``
        truncated SVD of ``R(W)``, ``A_r = sqrt(s_r) u_r``, ``B_r = sqrt(s_r) v_r`` (reshaped).

        Exact (returns True) when the factors cover ``in``/``out`` exactly. With padding the padded
        slots of ``R(W)`` are free (only the true ``(out, in)`` corner counts): a low-rank problem with
        missing entries, which has no closed form. The zero-filled SVD is then improved by alternating
        least squares on the true entries only (:func:`_masked_als`, each sweep lowers the error), and
        True is returned only if that reaches zero error (``W`` was such a corner), else False so that
        deftly refines it. With ``cov``: the plain projection, and False (no closed form).
        """
        (i1, i2), (o1, o2), r = self.in_factors, self.out_factors, self.rank
        R = self._rearrange(weight)
        U, V = low_rank_factors(R, r)
        exact = True
        if o1 * o2 != self.out_features or i1 * i2 != self.in_features:
            free = ~self._rearrange(torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
            U, V, exact = _masked_als(R, free, U, V)
        set_param_(self.A, U.mT.reshape(r, o1, i1))  # A_r = column r of U
        set_param_(self.B, V.reshape(r, o2, i2))  # B_r = row r of V
        return exact and cov is None

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        """Factorisations: for each side the balanced pair ``(f1, f2)``, its swap ``(f2, f1)`` and the
        lopsided pair from ``balanced_factors(n, 3)`` (about ``n^(2/3) x n^(1/3)``) and its swap; every
        (in, out) combination of those, with ranks ``1..32`` then steps of about 1.25x, up to the rank of
        ``R(W)`` (``min(o1*i1, o2*i2)``; higher ranks add nothing) and while the layer stores no more
        than the dense ``in * out`` (rank 1 is always kept). Under 1,000 candidates for 4096-sized layers."""
        def pairs(n: int) -> list[tuple[int, int]]:
            f1, f2 = balanced_factors(n, 2)
            g1, g2, g3 = balanced_factors(n, 3)
            out: list[tuple[int, int]] = []
            for p in ((f1, f2), (f2, f1), (g1 * g2, g3), (g3, g1 * g2)):
                if p not in out:
                    out.append(p)
            return out

        ranks = list(range(1, 33))
        while ranks[-1] < in_features * out_features:
            ranks.append(int(ranks[-1] * 1.25))
        dense = in_features * out_features
        cands: list[dict] = []
        for inf in pairs(in_features):
            for outf in pairs(out_features):
                top = min(outf[0] * inf[0], outf[1] * inf[1])
                for r in ranks:
                    if r > 1 and (r > top or cls.param_count(in_features, out_features, in_factors=inf,
                                                              out_factors=outf, rank=r) > dense):
                        break
                    cands.append({"in_factors": inf, "out_factors": outf, "rank": r})
        return cands

    # ------------------------------------------------------------------ counts
    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *, in_factors: tuple[int, int],
                    out_factors: tuple[int, int], rank: int = 1) -> float:
        """Padding of the factorisations first, then lopsided factors (log of the factor ratios)."""
        (i1, i2), (o1, o2) = in_factors, out_factors
        pad = (i1 * i2 - in_features) / in_features + (o1 * o2 - out_features) / out_features
        return 10.0 * pad + 0.1 * (abs(math.log(i1 / i2)) + abs(math.log(o1 / o2)))

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, in_factors: tuple[int, int],
                    out_factors: tuple[int, int], rank: int) -> int:
        (i1, i2), (o1, o2) = in_factors, out_factors
        return rank * (o1 * i1 + o2 * i2)

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, in_factors: tuple[int, int],
                   out_factors: tuple[int, int], rank: int) -> int:
        (i1, i2), (o1, o2) = in_factors, out_factors
        if cls._b_first(in_factors, out_factors):
            return 2 * rank * i1 * o2 * (i2 + o1)
        return 2 * rank * i2 * o1 * (i1 + o2)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        # default (balanced) factors, which fit any sizes; the generic suite may reuse an example at
        # another size, so explicit factor tuples are exercised in tests/test_kronecker.py instead
        (i1, i2), (o1, o2) = balanced_factors(in_features, 2), balanced_factors(out_features, 2)
        return [{"rank": r} for r in sorted({1, min(2, o1 * i1, o2 * i2)})]
