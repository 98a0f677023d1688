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

from ..base import StructuredLinear, check_int, init_uniform_
from ..partition import balanced_factors
from ..registry import register


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


@register
class Kronecker(StructuredLinear):
    """``sum_r A_r (x) B_r`` with ``A_r: (o1, i1)``, ``B_r: (o2, i2)``; ``rank*(o1*i1 + o2*i2)`` params."""

    name = "kronecker"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 in_factors: tuple[int, int] | None = None, out_factors: tuple[int, int] | None = None,
                 rank: int = 1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if in_factors is None:
            in_factors = balanced_factors(in_features, 2)
        if out_factors is None:
            out_factors = balanced_factors(out_features, 2)
        self.in_factors = check_factors("Kronecker", "in_factors", in_factors, in_features, 2, "in_features")
        self.out_factors = check_factors("Kronecker", "out_factors", out_factors, out_features, 2,
                                         "out_features")
        self.rank = check_int("Kronecker", "rank", rank, fix="Use rank >= 1 (rank 1 is a single A (x) B).")
        (i1, i2), (o1, o2), r = self.in_factors, self.out_factors, self.rank
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

    # ------------------------------------------------------------------ counts
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
        return [{"rank": 1}, {"rank": 2}]

    @classmethod
    def bad_examples(cls) -> list[dict]:
        return [{"in_factors": (3, 5)}, {"out_factors": (2, 2)}, {"in_factors": (4, 2, 2)},
                {"out_factors": (0, 16)}, {"in_factors": 16}, {"rank": 0}, {"rank": 1.0}]
