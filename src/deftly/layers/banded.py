"""``banded``: a weight with ``lower`` sub-diagonals and ``upper`` super-diagonals, stored by diagonal.

``W[i, j]`` may be nonzero only for ``-lower <= j - i <= upper`` (``W`` is ``(out, in)``, any shape).
This is the classic band matrix (Golub & Van Loan, "Matrix Computations", 4th ed., sec. 4.3); with
``lower = upper = 1`` it is the tridiagonal stencil of a finite-difference operator, e.g.
``deftly.make("banded", n, n, lower=1, upper=1)``.

**Storage.** ``weight: (lower + upper + 1, out)`` — row ``d`` is the diagonal of offset ``k = d - lower``
(``k < 0`` below the main diagonal), indexed by the output row: ``W[i, i + k] = weight[d, i]``. A
diagonal that leaves the rectangle has *corner* slots ``weight[d, i]`` with ``i + k < 0`` or
``i + k >= in``: they are stored (so they count in ``num_params()``, which equals the sum of ``numel``:
``(lower + upper + 1) * out``), but they are inert — the fast multiply pairs them with zero padding, the
reference and ``to_dense`` skip them, their gradient is identically zero, and the init sets them to zero.
The number of structural nonzeros is given by :meth:`Banded.band_nonzeros`.

**Multiply.** ``x`` is zero-padded by ``lower`` on the left and ``max(0, out + upper - in)`` on the right,
so output ``i`` reads the window ``x_pad[i : i + lower + upper + 1]``; the windows are an ``unfold`` view
and the weighted sum ``y[:, i] = sum_d weight[d, i] * window[:, i, d]`` is a ``bmm`` batched over output
rows ``(out, batch, g) @ (out, g, 1)``, over chunks of ``g <= 32`` diagonals to bound the temporary.
Because it is a ``bmm``, ``FlopCounterMode`` sees exactly ``flop_count`` =
``2 * (lower + upper + 1) * out`` per row, corner slots included.

**Rectangular shapes.** The band follows the main diagonal ``j = i``: in a tall layer
(``out > in + lower``) the rows ``i >= in + lower`` have no entries and output only the bias; in a wide
layer the inputs ``j > out - 1 + upper`` are ignored. Use ``lower >= out - in`` (tall) or
``upper >= in - out`` (wide) to reach every row/column.

**Init.** Row ``i`` has ``nnz_i`` structural entries; each gets variance ``1 / (3 nnz_i)``, so every
nonempty output has nn.Linear's output variance ``1/3`` on unit inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..base import StructuredLinear, check_int, init_uniform_
from ..registry import register

# diagonals per unfold chunk: bounds the (out, batch, _CHUNK) operand bmm may copy
_CHUNK = 32


def _diag_span(in_features: int, out_features: int, offset: int) -> tuple[int, int]:
    """Rows ``[i0, i1)`` where the diagonal ``j = i + offset`` lies inside the ``(out, in)`` rectangle."""
    i0 = max(0, -offset)
    i1 = min(out_features, in_features - offset)
    return i0, max(i0, i1)


@register
class Banded(StructuredLinear):
    """Band matrix with ``lower`` sub- and ``upper`` super-diagonals; ``(lower+upper+1)*out`` stored params.

    Defaults (``None``): ``lower = upper = 1`` (tridiagonal), clipped to ``out - 1`` / ``in - 1``.
    """

    name = "banded"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, lower: int | None = None,
                 upper: int | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if lower is None:
            lower = min(1, out_features - 1)
        if upper is None:
            upper = min(1, in_features - 1)
        self.lower = check_int(
            "Banded", "lower", lower, minimum=0, maximum=out_features - 1,
            fix=f"lower counts sub-diagonals below the main one; an (out={out_features}) x "
                f"(in={in_features}) matrix has only out - 1 = {out_features - 1} of them, so "
                f"use 0 <= lower <= {out_features - 1}.")
        self.upper = check_int(
            "Banded", "upper", upper, minimum=0, maximum=in_features - 1,
            fix=f"upper counts super-diagonals above the main one; an (out={out_features}) x "
                f"(in={in_features}) matrix has only in - 1 = {in_features - 1} of them, so "
                f"use 0 <= upper <= {in_features - 1}.")
        ndiag = self.lower + self.upper + 1
        # row d = diagonal of offset d - lower, indexed by output row: W[i, i + d - lower] = weight[d, i]
        self.weight = nn.Parameter(torch.empty(ndiag, out_features, **self._factory))  # (ndiag, out)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"lower": self.lower, "upper": self.upper}

    # ------------------------------------------------------------------ structure helpers
    def _valid_mask(self) -> Tensor:
        """``(ndiag, out)`` bool: True where ``weight[d, i]`` lies inside the rectangle."""
        dev = self.weight.device
        d = torch.arange(self.lower + self.upper + 1, device=dev).unsqueeze(1)  # (ndiag, 1)
        i = torch.arange(self.out_features, device=dev).unsqueeze(0)  # (1, out)
        j = i + d - self.lower  # column of weight[d, i]
        return (j >= 0) & (j < self.in_features)

    @classmethod
    def band_nonzeros(cls, in_features: int, out_features: int, *, lower: int, upper: int) -> int:
        """Structural nonzeros of the band (stored corner slots excluded)."""
        total = 0
        for k in range(-lower, upper + 1):
            i0, i1 = _diag_span(in_features, out_features, k)
            total += i1 - i0
        return total

    def _reset_structure(self) -> None:
        mask = self._valid_mask()  # (ndiag, out)
        nnz = mask.sum(0).clamp(min=1)  # (out,) structural fan-in of each row
        std = (1.0 / (3.0 * nnz.to(torch.float64))).sqrt()  # per-row std
        with torch.no_grad():
            # unit-variance uniform, then per-row std, then corners zeroed
            init_uniform_(self.weight, 1.0)
            self.weight.mul_((std.unsqueeze(0) * mask).to(self.weight.dtype))

    # ------------------------------------------------------------------ multiplies
    def _matmul(self, x: Tensor) -> Tensor:
        out, ndiag = self.out_features, self.lower + self.upper + 1
        right = max(0, out + self.upper - self.in_features)
        xp = F.pad(x, (self.lower, right))  # (batch, lower + in + right): x_pad[i + d] = x[i + d - lower]
        y = None
        for c in range(0, ndiag, _CHUNK):
            g = min(_CHUNK, ndiag - c)
            win = xp[:, c:c + out + g - 1].unfold(-1, g, 1)  # (batch, out, g): win[:, i, t] = x_pad[i+c+t]
            w = self.weight[c:c + g].T.unsqueeze(-1)  # (out, g, 1)
            part = torch.bmm(win.transpose(0, 1), w)  # (out, batch, 1): one dot product per output row
            y = part if y is None else y + part
        return y.squeeze(-1).T  # (batch, out)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # one diagonal at a time, only its in-rectangle span, no padding
        y = x.new_zeros(x.shape[0], self.out_features)
        for d in range(self.lower + self.upper + 1):
            k = d - self.lower
            i0, i1 = _diag_span(self.in_features, self.out_features, k)
            if i1 > i0:
                contrib = self.weight[d, i0:i1] * x[:, i0 + k:i1 + k]  # (batch, i1 - i0)
                y = y + F.pad(contrib, (i0, self.out_features - i1))
        return y

    def to_dense(self) -> Tensor:
        mask = self._valid_mask()
        d, i = mask.nonzero(as_tuple=True)  # structural entries only
        j = i + d - self.lower
        W = self.weight.new_zeros(self.out_features, self.in_features)
        return W.index_put((i, j), self.weight[d, i])

    # ------------------------------------------------------------------ counts
    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, lower: int, upper: int) -> int:
        return (lower + upper + 1) * out_features  # corner slots included: they are stored

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, lower: int, upper: int) -> int:
        return 2 * (lower + upper + 1) * out_features  # corners multiply zero padding: counted

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        # reach every row (tall) and column (wide), then a margin of 1, 4/2 and a lower-only band
        lo, up = max(0, out_features - in_features), max(0, in_features - out_features)
        cands = [(lo + 1, up + 1), (lo + 4, up + 2), (lo + 2, 0)]
        seen: list[dict] = []
        for a, b in cands:
            ex = {"lower": min(a, out_features - 1), "upper": min(b, in_features - 1)}
            if ex not in seen:
                seen.append(ex)
        return seen

    @classmethod
    def bad_examples(cls) -> list[dict]:
        return [{"lower": -1}, {"upper": -2}, {"lower": 16}, {"upper": 16}, {"lower": 1.5},
                {"upper": "1"}]
