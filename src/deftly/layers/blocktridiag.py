"""``blocktridiag``: block-tridiagonal weight with square ``block x block`` blocks, as one ``bmm``.

The block analogue of a band matrix (Golub & Van Loan, "Matrix Computations", 4th ed., sec. 4.5.1,
block tridiagonal systems): the ``(out, in)`` weight is cut into a grid of ``R = ceil(out/block)``
block-rows and ``C = ceil(in/block)`` block-columns, and only the blocks ``(i, j)`` with ``|i - j| <= 1``
are nonzero.

**Storage and multiply.** ``weight: (R, block, 3*block)`` — block-row ``i`` holds its three blocks side by
side, for block-columns ``i-1, i, i+1``. The input is zero-padded by one block on the left and at the end
up to ``max(R + 2, C + 1)`` blocks, so block-row ``i`` reads the window ``x_pad[i*block : (i+3)*block]``;
the ``R`` windows are an ``unfold`` view (step ``block``) and the whole multiply is ONE ``bmm``
``(R, batch, 3*block) @ (R, 3*block, block)``, then the output is truncated to ``out``.

**Padding, counted honestly.** Slots that meet padding are stored but inert: the left third of
block-row 0, blocks ``(i, j)`` with ``j >= C``, the columns past ``in`` in the last block-column and the
rows past ``out`` in the last block-row. They count in ``num_params()`` (``3 * R * block**2``, the sum of
``numel``) and in ``flop_count`` (``6 * R * block**2`` per row, exactly what ``FlopCounterMode`` sees);
they get zero gradient, are zero at init and are skipped by ``to_dense`` and the reference multiply.

**Rectangular shapes.** The blocks follow the block diagonal ``j = i``: in a tall layer block-rows
``i >= C + 1`` have no blocks and output only the bias (use ``block >= out - in`` to avoid that); in a
wide layer block-columns ``j >= R + 1`` are ignored.

**Init.** Block-row ``i`` sees ``f_i`` real inputs in its window; its entries get variance
``1 / (3 f_i)``, so every nonempty output has nn.Linear's output variance ``1/3`` on unit inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import set_param_
from ..core.partition import ceil_div
from ..core.registry import register
from .banded import gram_solve, unit_dead_slots

# entries of the (block-rows, 3*block, 3*block) Gram blocks built at once by the activation-aware projection
_GRAM_ENTRIES = 1 << 22


@register
class BlockTridiagonal(StructuredLinear):
    """Block-tridiagonal with ``block x block`` blocks; ``3 * ceil(out/block) * block**2`` params.

    Default ``block`` (``None``): ``ceil(min(in, out) / 16)``, i.e. 16 block-rows for a square layer.
    """

    name = "blocktridiag"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if block is None:
            block = ceil_div(min(in_features, out_features), 16)
        big = max(in_features, out_features)
        self.block = check_int(
            "BlockTridiagonal", "block", block, maximum=big,
            fix=f"A block larger than both sides of the ({out_features} x {in_features}) weight is a "
                f"single zero-padded dense block: use 1 <= block <= max(in, out) = {big}.")
        b = self.block
        self.nrows = ceil_div(out_features, b)  # R block-rows
        self.ncols = ceil_div(in_features, b)  # C block-columns
        # block-row i: [W(i, i-1) | W(i, i) | W(i, i+1)]
        self.weight = nn.Parameter(torch.empty(self.nrows, b, 3 * b, **self._factory))  # (R, b, 3b)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"block": self.block}

    # ------------------------------------------------------------------ structure helpers
    def _valid_mask(self) -> Tensor:
        """``(R, b, 3b)`` bool: True for slots that meet a real input and a real output."""
        b, R = self.block, self.nrows
        dev = self.weight.device
        i = torch.arange(R, device=dev).view(R, 1, 1)
        s = torch.arange(b, device=dev).view(1, b, 1)
        c = torch.arange(3 * b, device=dev).view(1, 1, 3 * b)
        row = i * b + s  # output feature
        col = (i - 1) * b + c  # input feature
        return (row < self.out_features) & (col >= 0) & (col < self.in_features)

    def _reset_structure(self) -> None:
        mask = self._valid_mask()  # (R, b, 3b)
        fan_in = mask.any(1).sum(-1).clamp(min=1)  # (R,) real inputs seen by block-row i
        std = (1.0 / (3.0 * fan_in.to(torch.float64))).sqrt().view(-1, 1, 1)
        with torch.no_grad():
            init_uniform_(self.weight, 1.0, scale=std * mask)

    # ------------------------------------------------------------------ multiplies
    def _matmul(self, x: Tensor) -> Tensor:
        b, R = self.block, self.nrows
        width = max(R + 2, self.ncols + 1) * b
        xp = F.pad(x, (b, width - b - self.in_features))  # (batch, width): one zero block on the left
        win = xp.unfold(-1, 3 * b, b)[:, :R]  # (batch, R, 3b) view: blocks i-1, i, i+1 of x
        y = torch.bmm(win.transpose(0, 1), self.weight.transpose(1, 2))  # (R, batch, b)
        y = y.transpose(0, 1).reshape(x.shape[0], R * b)  # (batch, R*b)
        return y[:, : self.out_features]

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # block by block, only real rows/columns, no padding
        b, n_in, n_out = self.block, self.in_features, self.out_features
        rows = []
        for i in range(self.nrows):
            r0, r1 = i * b, min((i + 1) * b, n_out)
            acc = x.new_zeros(x.shape[0], r1 - r0)
            for w, j in enumerate((i - 1, i, i + 1)):
                c0, c1 = j * b, min((j + 1) * b, n_in)
                if j < 0 or c0 >= n_in:
                    continue
                blk = self.weight[i, : r1 - r0, w * b:w * b + (c1 - c0)]  # (r1-r0, c1-c0)
                acc = acc + x[:, c0:c1] @ blk.T
            rows.append(acc)
        return torch.cat(rows, dim=-1)

    def to_dense(self) -> Tensor:
        b, R = self.block, self.nrows
        nb = max(R + 2, self.ncols + 1)  # block-columns of the left-padded grid
        Wd = self.weight.reshape(R, b, 3, b).permute(0, 2, 1, 3)  # (R, 3, b, b): block (i, i-1+w)
        grid = self.weight.new_zeros(R, nb, b, b)  # (block-row, padded block-col, b, b)
        rows = torch.arange(R, device=self.weight.device)
        for w in range(3):
            grid = grid.index_put((rows, rows + w), Wd[:, w])
        full = grid.permute(0, 2, 1, 3).reshape(R * b, nb * b)
        return full[: self.out_features, b: b + self.in_features]

    # ------------------------------------------------------------------ projection
    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Exact projection onto the block-tridiagonal pattern (padding slots stay zero): returns True.

        Plain: block extraction — the Frobenius-nearest matrix with this support keeps ``W`` on it.
        With ``cov = C``: the objective splits over rows and all rows of block-row ``i`` share the
        support ``J`` = its (up to) three block-columns, so each block-row is one least-squares solve
        ``S_J = W_J + C_JJ^+ C_{J,J^c} W_{J^c} = W_J + C_JJ^+ ((W C)_J - W_J C_JJ)^T`` (rows as
        columns), batched over block-rows (LU solves, pseudo-inverse where ``C_JJ`` is singular:
        :func:`deftly.layers.banded.gram_solve`). Cost ``O(out * in^2 + out * block^2)``.
        """
        b, R = self.block, self.nrows
        n_in, n_out = self.in_features, self.out_features
        nb = max(R + 2, self.ncols + 1)  # block-columns of the left-padded grid, as in to_dense
        dev = weight.device
        cols = (torch.arange(R, device=dev) * b).unsqueeze(1) + torch.arange(3 * b, device=dev)  # (R, 3b)

        def windows(M: Tensor) -> Tensor:  # (out, in) -> (R, b, 3b): block-row i, padded cols i*b..(i+3)*b
            grid = M.new_zeros(R * b, nb * b)
            grid[:n_out, b:b + n_in] = M
            return grid.reshape(R, b, nb * b).gather(2, cols.unsqueeze(1).expand(R, b, 3 * b))

        blocks = windows(weight)
        if cov is not None:
            cov = cov.to(dev)
            valid = (cols >= b) & (cols < b + n_in)  # (R, 3b): window slot is a real input
            real = cols.clamp(b, b + n_in - 1) - b  # its input feature (clamped)
            cwin = windows(weight @ cov.to(weight.dtype))  # (R, b, 3b): rows of (W C) on the window
            step = max(1, _GRAM_ENTRIES // (9 * b * b))
            for s in range(0, R, step):
                c, v = real[s:s + step], valid[s:s + step]
                pair = v.unsqueeze(2) & v.unsqueeze(1)
                gram = torch.where(pair, cov[c.unsqueeze(2), c.unsqueeze(1)],
                                   torch.zeros((), dtype=cov.dtype, device=dev))
                gram = unit_dead_slots(gram, v)  # (chunk, 3b, 3b)
                wj = blocks[s:s + step]  # (chunk, b, 3b)
                # rows of C_{J,J^c} W_{J^c}; zero in dead slots and padded output rows (so is the fix)
                rhs = cwin[s:s + step] - wj @ gram.to(weight.dtype)
                corr = gram_solve(gram, rhs.mT).mT
                blocks[s:s + step] = torch.where(v.unsqueeze(1), wj + corr, torch.zeros((), dtype=wj.dtype,
                                                                                       device=dev))
        set_param_(self.weight, blocks)
        return True

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        """Every block size ``1 .. min(in, out)`` whose stored weight (``3 * ceil(out/b) * b**2``) does not
        exceed the dense ``in * out`` (``block=1`` is always kept): about ``min(in, out) / 3`` candidates."""
        dense = in_features * out_features
        return [{"block": b} for b in range(1, min(in_features, out_features) + 1)
                if b == 1 or cls.param_count(in_features, out_features, block=b) <= dense]

    # ------------------------------------------------------------------ counts
    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, block: int) -> int:
        return 3 * ceil_div(out_features, block) * block * block  # padding slots included

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, block: int) -> int:
        return 2 * cls.param_count(in_features, out_features, block=block)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        # block >= out - in leaves no block-row of a tall layer empty
        lo = max(1, out_features - in_features)
        m = min(in_features, out_features)
        seen: list[dict] = []
        for blk in (ceil_div(m, 8), ceil_div(m, 3), m):
            ex = {"block": max(lo, blk)}
            if ex not in seen:
                seen.append(ex)
        return seen
