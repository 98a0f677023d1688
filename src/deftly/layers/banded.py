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

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import set_param_
from ..core.registry import register

# diagonals per unfold chunk: bounds the (out, batch, _CHUNK) operand bmm may copy
_CHUNK = 32
# entries of the (rows, ndiag, ndiag) Gram blocks built at once by the activation-aware projection
_GRAM_ENTRIES = 1 << 22


def _diag_span(in_features: int, out_features: int, offset: int) -> tuple[int, int]:
    """Rows ``[i0, i1)`` where the diagonal ``j = i + offset`` lies inside the ``(out, in)`` rectangle."""
    i0 = max(0, -offset)
    i1 = min(out_features, in_features - offset)
    return i0, max(i0, i1)


def unit_dead_slots(gram: Tensor, valid: Tensor) -> Tensor:
    """Give the dead (padding/corner) slots of a batch of Gram blocks ``gram (batch, g, g)`` (already
    zero in their rows/columns) a decoupled diagonal entry, scaled like the block, so that
    :func:`gram_solve` returns 0 there for a right-hand side that is 0 there."""
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-300)
    return gram + torch.diag_embed((~valid).to(gram.dtype) * scale)


def gram_solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """``gram^+ rhs`` for a batch of PSD ``gram (batch, g, g)`` (float64) and ``rhs (batch, g, k)``.

    Batched LU solve (the fastest batched factorisation on CPU); the blocks where it fails or has a
    pivot below ``1e-12`` of the block's largest diagonal entry (singular or nearly singular, e.g. fewer
    calibration samples than ``g``) are solved by the eigen-decomposition pseudo-inverse instead
    (eigenvalues below ``g * 1e-13`` of the largest dropped). For the least-squares corrections of a
    fixed-support projection ``rhs`` lies in the range of ``gram``, so either way the result is an
    exact minimiser.
    """
    LU, piv, info = torch.linalg.lu_factor_ex(gram)
    top = gram.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    good = (info == 0) & (LU.diagonal(dim1=-2, dim2=-1).abs().amin(-1) > 1e-12 * top)
    eye = torch.eye(gram.shape[-1], dtype=LU.dtype, device=LU.device)
    out = torch.linalg.lu_solve(torch.where(good.view(-1, 1, 1), LU, eye).to(rhs.dtype), piv, rhs)
    bad = (~good).nonzero().squeeze(-1)
    if bad.numel():
        lam, Q = torch.linalg.eigh(gram[bad])
        tol = lam.abs().amax(-1, keepdim=True).clamp_min(1e-300) * (gram.shape[-1] * 1e-13)
        inv = torch.where(lam > tol, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
        Qc = Q.to(rhs.dtype)
        out[bad] = Qc @ (inv.to(rhs.dtype).unsqueeze(-1) * (Qc.mT @ rhs[bad]))
    return out


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
            init_uniform_(self.weight, 1.0, scale=std.unsqueeze(0) * mask)

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
        assert y is not None  # ndiag >= 1: the loop ran
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

    # ------------------------------------------------------------------ projection
    def _band_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(out, ndiag)``: the column ``i + d - lower`` of slot ``weight[d, i]`` (clamped into range) and
        whether it lies inside the rectangle (False for the dead corner slots)."""
        i = torch.arange(self.out_features, device=device).unsqueeze(1)  # (out, 1)
        d = torch.arange(self.lower + self.upper + 1, device=device).unsqueeze(0)  # (1, ndiag)
        j = i + d - self.lower
        valid = (j >= 0) & (j < self.in_features)
        return j.clamp(0, self.in_features - 1), valid

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Exact projection onto the band (corners stay zero); always optimal, so returns True.

        Plain: entry extraction ``S[i, j] = W[i, j]`` on the band — the Frobenius-nearest band matrix.
        With ``cov = C`` the objective ``sum_i (w_i - s_i) C (w_i - s_i)^T`` splits over rows, and row
        ``i`` restricted to its band columns ``J_i`` is a small least-squares problem:
        ``s_J = w_J + C_JJ^+ C_{J,J^c} w_{J^c} = w_J + C_JJ^+ ((C w)_J - C_JJ w_J)`` — solved for all
        rows at once (batched LU solves with the ``(ndiag, ndiag)`` blocks ``C_JJ``, pseudo-inverse where
        they are singular: :func:`gram_solve`), in chunks of rows. Cost ``O(out * in^2 + out * ndiag^3)``.
        """
        cols, valid = self._band_index(weight.device)
        w_band = torch.where(valid, weight.gather(1, cols), torch.zeros((), dtype=weight.dtype,
                                                                         device=weight.device))
        if cov is not None:
            w_band = self._band_least_squares(weight, cov, cols, valid, w_band)
        set_param_(self.weight, w_band.T)  # (ndiag, out)
        return True

    @staticmethod
    def _band_least_squares(weight: Tensor, cov: Tensor, cols: Tensor, valid: Tensor,
                            w_band: Tensor) -> Tensor:
        """Rows ``s_i`` on their band columns minimising ``(w_i - s_i) C (w_i - s_i)^T`` (see above)."""
        dtype = weight.dtype
        cov = cov.to(weight.device)
        cw = weight @ cov.to(dtype)  # (out, in): row i is (C w_i)^T (C symmetric)
        out_f, g = cols.shape
        zero = torch.zeros((), dtype=dtype, device=weight.device)
        result = torch.empty_like(w_band)
        step = max(1, _GRAM_ENTRIES // (g * g))
        for s in range(0, out_f, step):
            c, v, wj = cols[s:s + step], valid[s:s + step], w_band[s:s + step]
            pair = v.unsqueeze(2) & v.unsqueeze(1)
            gram = torch.where(pair, cov[c.unsqueeze(2), c.unsqueeze(1)], torch.zeros((), dtype=cov.dtype,
                                                                                      device=cov.device))
            gram = unit_dead_slots(gram, v)
            rhs = torch.where(v, cw[s:s + step].gather(1, c), zero)
            rhs = rhs - (gram.to(dtype) @ wj.unsqueeze(-1)).squeeze(-1)  # C_{J,J^c} w_{J^c}
            corr = gram_solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
            result[s:s + step] = torch.where(v, wj + corr, zero)
        return result

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        """Bands for budgeted surgery, cheapest first within each family: symmetric ``(w, w)``, the
        even-width ``(w + 1, w)``, and for rectangular layers the bands that reach every row/column
        ``(max(0, out - in) + w, max(0, in - out) + w)``. ``w`` runs over every value up to 256, then
        every 8th; bands storing more than the dense ``in * out`` entries are left out (the main diagonal
        ``(0, 0)`` is always kept). About 1,000 candidates for a 4096 x 4096 layer,
        1,500 at most for 4096-sized rectangular ones."""
        lo0, up0 = max(0, out_features - in_features), max(0, in_features - out_features)
        wmax = min(in_features, out_features) - 1
        ws = list(range(min(wmax, 256) + 1)) + list(range(264, wmax + 1, 8))
        seen: set[tuple[int, int]] = set()
        cands: list[dict] = []
        for base_lower, base_upper in ((0, 0), (1, 0), (lo0, up0)):
            for w in ws:
                lower, upper = base_lower + w, base_upper + w
                if lower > out_features - 1 or upper > in_features - 1 or (lower, upper) in seen:
                    continue
                if (lower, upper) != (0, 0) and lower + upper + 1 > in_features:  # costs more than dense
                    continue
                seen.add((lower, upper))
                cands.append({"lower": lower, "upper": upper})
        return cands

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
