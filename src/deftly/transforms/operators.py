"""Fixed linear operators built from sparse factors: the building blocks of :mod:`deftly.transforms`.

Every fast transform here (FFT, Bluestein, DCT, circulant, Toeplitz, derivatives) is a :class:`Compose`
of a few kinds of factor, each an :class:`~deftly.transforms.base.Operator` (the base, its layout, casts
and FLOP conventions are in :mod:`deftly.transforms.base`):

* :class:`Gather` — permutation / zero-padding / truncation through one index buffer (0 FLOPs);
* :class:`Diagonal` and :class:`Scale` — elementwise products;
* :class:`Radix2` — ``log2 n`` radix-2 butterfly stages (optionally after a bit-reversal gather);
* :class:`KronIdentity` — ``A ⊗ I_q``: ``A`` applied to ``q`` interleaved sub-vectors, by a reshape
  (this is the block-diagonal factor of a mixed-radix / Monarch product, up to the stride permutation);
* :class:`DenseMatrix` — a small dense block (e.g. a DFT of a small prime size);
* :class:`ToComplex` / :class:`RealPart` — real <-> complex stages for real transforms (DCT, real
  circulants); :class:`SparseMatrix`, :class:`Sum`, :class:`LayerOperator` for corrections and sums.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core import StructuredLinear
from ..layers.butterfly import bit_reversal, radix2_twiddles, stage_positions
from .base import REAL_PART, Factor, Operator
from .casting import exact_copy

__all__ = [
    "REAL_PART",
    "Compose",
    "DenseMatrix",
    "Diagonal",
    "Gather",
    "KronIdentity",
    "LayerOperator",
    "Operator",
    "Radix2",
    "RealPart",
    "Scale",
    "SparseMatrix",
    "Sum",
    "ToComplex",
]


def _coo(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """A coalesced CPU COO matrix (``to_dense`` multiplies the factors on the CPU)."""
    return torch.sparse_coo_tensor(torch.stack([rows.cpu(), cols.cpu()]), vals.cpu(), shape,
                                   check_invariants=True).coalesce()


def _operators(ops: nn.ModuleList) -> Sequence[Operator]:
    """The operators held in ``ops`` (an ``nn.ModuleList`` of :class:`Operator`, typed as such)."""
    return cast("Sequence[Operator]", ops)


def _as_operators(ops: Sequence[Operator | StructuredLinear]) -> list[Operator]:
    """``ops`` with every structured layer wrapped in a :class:`LayerOperator`."""
    return [op if isinstance(op, Operator) else LayerOperator(op) for op in ops]


class Compose(Operator):
    """Apply ``ops[0]``, then ``ops[1]``, ...: the matrix ``ops[-1] ... ops[0]``.

    Nested :class:`Compose` are flattened and adjacent :class:`Gather` are merged into one gather.
    """

    ops: nn.ModuleList

    def __init__(self, ops: Sequence[Operator | StructuredLinear]) -> None:
        flat: list[Operator] = []
        for op in _as_operators(ops):
            for o in (_operators(op.ops) if type(op) is Compose else [op]):
                last = flat[-1] if flat else None
                if isinstance(o, Gather) and isinstance(last, Gather):
                    flat[-1] = last.then(o)
                else:
                    flat.append(o)
        if not flat:
            raise ValueError("Compose: needs at least one operator")
        for a, b in itertools.pairwise(flat):
            if a.out_features != b.in_features or a.out_dtype != b.in_dtype:
                raise ValueError(f"Compose: {type(a).__name__} outputs ({a.out_features}, {a.out_dtype}) but "
                                 f"{type(b).__name__} expects ({b.in_features}, {b.in_dtype})")
        super().__init__(flat[0].in_features, flat[-1].out_features, in_dtype=flat[0].in_dtype,
                         out_dtype=flat[-1].out_dtype)
        self.ops = nn.ModuleList(flat)

    def _apply_cols(self, h: Tensor) -> Tensor:
        for op in _operators(self.ops):
            h = op._apply_cols(h)
        return h

    def _reference_matmul(self, x: Tensor) -> Tensor:
        for op in _operators(self.ops):
            x = op._reference_matmul(x)
        return x

    def sparse_factors(self) -> list[Factor]:
        return [f for op in _operators(self.ops) for f in op.sparse_factors()]

    def row_flops(self) -> int:
        return sum(op.row_flops() for op in _operators(self.ops))


class Gather(Operator):
    """``y[i] = x[index[i]]``, or 0 where ``index[i] == in_features``: permutation, padding, truncation."""

    index: Tensor
    has_zeros: bool

    def __init__(self, index: Tensor, in_features: int, dtype: torch.dtype) -> None:
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() > in_features):
            raise ValueError(f"Gather: index values must lie in [0, {in_features}]")
        super().__init__(in_features, index.numel(), in_dtype=dtype)
        self._constant("index", index)
        self.has_zeros = bool((index == in_features).any())

    @classmethod
    def permutation(cls, index: Tensor, dtype: torch.dtype) -> Gather:
        return cls(index, len(index), dtype)

    @classmethod
    def pad(cls, n: int, m: int, dtype: torch.dtype) -> Gather:
        """``(n,) -> (m,)``: keep the first ``min(n, m)`` entries, zeros after."""
        return cls(torch.arange(m).clamp(max=n), n, dtype)

    def then(self, other: Gather) -> Gather:
        """The gather equal to applying ``self`` then ``other``."""
        src = torch.cat([self.index, self.index.new_tensor([self.in_features])])  # sentinel stays a zero
        return Gather(src[other.index], self.in_features, self.in_dtype)

    def _apply_cols(self, h: Tensor) -> Tensor:
        if self.has_zeros:
            h = F.pad(h, (0, 0, 0, 1))  # row in_features is the zero row
        return h.index_select(0, self.index)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        zero = x.new_zeros(x.shape[0])
        return torch.stack([x[:, j] if j < self.in_features else zero for j in self.index.tolist()], -1)

    def sparse_factors(self) -> list[Factor]:
        index = self.index.cpu()
        keep = index < self.in_features
        rows = torch.arange(self.out_features)[keep]
        return [_coo(rows, index[keep], torch.ones(rows.numel(), dtype=self.in_dtype),
                     (self.out_features, self.in_features))]

    def row_flops(self) -> int:
        return 0


def _mul_flops(a: torch.dtype, b: torch.dtype) -> int:
    if a.is_complex and b.is_complex:
        return 6
    return 2 if (a.is_complex or b.is_complex) else 1


class Diagonal(Operator):
    """``y = d * x`` elementwise (``d`` real or complex; complex ``d`` needs complex input)."""

    d: Tensor

    def __init__(self, d: Tensor, dtype: torch.dtype) -> None:
        if d.is_complex() and not dtype.is_complex:
            raise ValueError(f"Diagonal: complex entries need a complex dtype, got {dtype}")
        super().__init__(d.numel(), d.numel(), in_dtype=dtype)
        target = dtype if d.is_complex() else dtype.to_real() if dtype.is_complex else dtype
        self._constant("d", d, target)

    def _apply_cols(self, h: Tensor) -> Tensor:
        return h * self.d.unsqueeze(1)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return torch.stack([x[:, i] * self.d[i] for i in range(self.in_features)], -1)

    def sparse_factors(self) -> list[Factor]:
        i = torch.arange(self.in_features)
        return [_coo(i, i, self.d, (self.in_features, self.in_features))]

    def row_flops(self) -> int:
        return self.in_features * _mul_flops(self.d.dtype, self.in_dtype)


class Scale(Operator):
    """``y = s * x`` for a real scalar ``s``."""

    s: float

    def __init__(self, n: int, s: float, dtype: torch.dtype) -> None:
        super().__init__(n, n, in_dtype=dtype)
        self.s = float(s)

    def _apply_cols(self, h: Tensor) -> Tensor:
        return h * self.s

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return torch.stack([x[:, i] * self.s for i in range(self.in_features)], -1)

    def sparse_factors(self) -> list[Factor]:
        i = torch.arange(self.in_features)
        return [_coo(i, i, torch.full((self.in_features,), self.s, dtype=self.in_dtype),
                     (self.in_features, self.in_features))]

    def row_flops(self) -> int:
        return self.in_features * (2 if self.in_dtype.is_complex else 1)

    def extra_repr(self) -> str:
        return f"n={self.in_features}, s={self.s:.6g}"


class Radix2(Operator):
    """``log2 n`` radix-2 stages ``y_p = x_p + w_t x_q``, ``y_q = x_p - w_t x_q`` (``q = p + s``,
    ``s = 1, 2, ..., n/2``), after an optional bit-reversal gather.

    With ``sign = -1`` (or ``+1``) and ``bitrev=True`` this is Cooley–Tukey's decimation-in-time FFT of
    the unnormalised DFT (or inverse DFT): ``w_t = exp(sign 2 pi i t / 2s)``. With ``sign=None`` there are
    no twiddles: the fast Walsh–Hadamard transform (Sylvester's ``H_n``), real or complex.
    """

    n: int
    sign: int | None
    log_n: int
    bitrev: Tensor | None
    twiddles: Tensor | None

    def __init__(self, n: int, sign: int | None, *, bitrev: bool, dtype: torch.dtype) -> None:
        if n < 1 or n & (n - 1):
            raise ValueError(f"Radix2: n={n} is not a power of two")
        if sign is not None and not dtype.is_complex:
            raise ValueError(f"Radix2: an FFT (sign={sign}) needs a complex dtype, got {dtype}")
        super().__init__(n, n, in_dtype=dtype)
        self.n, self.sign, self.log_n = n, sign, n.bit_length() - 1
        self._constant("bitrev", bit_reversal(n) if bitrev else None)
        # stage of stride s owns twiddles[s - 1 : 2s - 1] (n - 1 in all)
        tw = torch.cat(radix2_twiddles(n, sign)) if (sign is not None and n > 1) \
            else torch.zeros(0, dtype=torch.complex128)
        self._constant("twiddles", tw if sign is not None else None, dtype)

    def strides(self) -> list[int]:
        return [1 << j for j in range(self.log_n)]

    def _apply_cols(self, h: Tensor) -> Tensor:
        cols = h.shape[1]
        if self.bitrev is not None:
            h = h.index_select(0, self.bitrev)
        for s in self.strides():
            hv = h.reshape(self.n // (2 * s), 2, s, cols)  # (groups, 2, s, cols)
            top, bot = hv[:, 0], hv[:, 1]
            if self.twiddles is not None and s > 1:  # stride 1 has the single twiddle w_0 = 1
                bot = bot * self.twiddles[s - 1:2 * s - 1].unsqueeze(1)  # (s, 1) broadcast
            h = torch.stack((top + bot, top - bot), 1).reshape(self.n, cols)
        return h

    def apply_real_pairs(self, re: Tensor, im: Tensor) -> tuple[Tensor, Tensor]:
        """The same factors on ``(n, cols)`` real and imaginary parts in any real dtype (e.g. bfloat16,
        which has no complex counterpart in torch); twiddles are rounded to that dtype."""
        cols = re.shape[1]
        if self.bitrev is not None:
            re, im = re.index_select(0, self.bitrev), im.index_select(0, self.bitrev)
        w = (self.twiddles.real.to(re.dtype), self.twiddles.imag.to(re.dtype)) \
            if self.twiddles is not None else None
        for s in self.strides():
            rv, iv = re.reshape(self.n // (2 * s), 2, s, cols), im.reshape(self.n // (2 * s), 2, s, cols)
            tr, ti, br, bi = rv[:, 0], iv[:, 0], rv[:, 1], iv[:, 1]
            if w is not None and s > 1:
                wr, wi = w
                a, b = wr[s - 1:2 * s - 1].unsqueeze(1), wi[s - 1:2 * s - 1].unsqueeze(1)
                br, bi = br * a - bi * b, br * b + bi * a
            re = torch.stack((tr + br, tr - br), 1).reshape(self.n, cols)
            im = torch.stack((ti + bi, ti - bi), 1).reshape(self.n, cols)
        return re, im

    def _twiddle(self, s: int, t: int) -> Tensor | float:
        return 1.0 if self.twiddles is None else self.twiddles[s - 1 + t]

    def _reference_matmul(self, x: Tensor) -> Tensor:
        h = list(x.unbind(-1))
        if self.bitrev is not None:
            h = [h[j] for j in self.bitrev.tolist()]
        for s in self.strides():
            new = list(h)
            for g in range(self.n // (2 * s)):
                for t in range(s):
                    p, q = g * 2 * s + t, g * 2 * s + t + s
                    w = self._twiddle(s, t)
                    new[p], new[q] = h[p] + w * h[q], h[p] - w * h[q]
            h = new
        return torch.stack(h, -1)

    def sparse_factors(self) -> list[Factor]:
        out: list[Factor] = []
        if self.bitrev is not None:
            out += Gather.permutation(self.bitrev, self.in_dtype).sparse_factors()
        for s in self.strides():
            p, q = stage_positions(self.n, s)
            t = p % s  # twiddle exponent of the pair (p, p + s)
            w = torch.ones(p.numel(), dtype=self.in_dtype) if self.twiddles is None \
                else self.twiddles.cpu()[s - 1 + t]
            one = torch.ones_like(w)
            out.append(_coo(torch.cat([p, p, q, q]), torch.cat([p, q, p, q]), torch.cat([one, w, one, -w]),
                            (self.n, self.n)))
        return out

    def row_flops(self) -> int:
        add = 2 if self.in_dtype.is_complex else 1  # per add
        per_pair_adds = 2 * add
        total = 0
        for s in self.strides():
            mul = 6 if (self.twiddles is not None and s > 1) else 0
            total += (self.n // 2) * (per_pair_adds + mul)
        return total

    def extra_repr(self) -> str:
        kind = "hadamard" if self.sign is None else ("fft" if self.sign < 0 else "ifft (unnormalised)")
        return f"n={self.n}, {kind}, bitrev={self.bitrev is not None}, flops/row={self.row_flops()}"


class KronIdentity(Operator):
    """``A ⊗ I_q``: ``A`` applied to each of the ``q`` interleaved sub-vectors ``x[r::q]``, by a reshape."""

    inner: Operator
    q: int

    def __init__(self, inner: Operator, q: int) -> None:
        super().__init__(inner.in_features * q, inner.out_features * q, in_dtype=inner.in_dtype,
                         out_dtype=inner.out_dtype)
        self.inner, self.q = inner, q

    def _apply_cols(self, h: Tensor) -> Tensor:
        cols = h.shape[1]
        y = self.inner._apply_cols(h.reshape(self.inner.in_features, self.q * cols))  # (m', q * cols)
        return y.reshape(self.out_features, cols)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        parts = [self.inner._reference_matmul(x[:, r::self.q]) for r in range(self.q)]  # each (b, m')
        return torch.stack(parts, -1).reshape(x.shape[0], self.out_features)  # y[i*q + r]

    def sparse_factors(self) -> list[Factor]:
        out: list[Factor] = []
        for f in self.inner.sparse_factors():
            if isinstance(f, str):
                out.append(f)
                continue
            (i, j), v = f.indices(), f.values()
            r = torch.arange(self.q)
            rows = (i.unsqueeze(1) * self.q + r).reshape(-1)
            cols = (j.unsqueeze(1) * self.q + r).reshape(-1)
            out.append(_coo(rows, cols, v.repeat_interleave(self.q),
                            (f.shape[0] * self.q, f.shape[1] * self.q)))
        return out

    def row_flops(self) -> int:
        return self.q * self.inner.row_flops()

    def extra_repr(self) -> str:
        return f"q={self.q}"


class DenseMatrix(Operator):
    """``y = M x`` for a small dense ``M (out, in)``."""

    M: Tensor

    def __init__(self, M: Tensor, dtype: torch.dtype) -> None:
        super().__init__(M.shape[1], M.shape[0], in_dtype=dtype)
        self._constant("M", M, dtype)

    def _apply_cols(self, h: Tensor) -> Tensor:
        return self.M @ h

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return torch.stack([(x * self.M[o]).sum(-1) for o in range(self.out_features)], -1)

    def sparse_factors(self) -> list[Factor]:
        return [self.M.cpu().to_sparse()]

    def row_flops(self) -> int:
        return (8 if self.in_dtype.is_complex else 2) * self.M.numel()


class ToComplex(Operator):
    """Real ``(n,)`` -> complex ``(n,)``."""

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        super().__init__(n, n, in_dtype=dtype, out_dtype=dtype.to_complex())

    def _apply_cols(self, h: Tensor) -> Tensor:
        return h.to(self.out_dtype)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return torch.complex(x, torch.zeros_like(x))

    def sparse_factors(self) -> list[Factor]:
        return []

    def row_flops(self) -> int:
        return 0


class RealPart(Operator):
    """Complex -> real: ``y = Re(d * x)`` (``d`` optional): 3 FLOPs per entry with ``d``, else 0.

    Real-linear only: the dense form is exact for real inputs of the enclosing operator.
    """

    d: Tensor | None

    def __init__(self, n: int, dtype: torch.dtype, d: Tensor | None = None) -> None:
        super().__init__(n, n, in_dtype=dtype, out_dtype=dtype.to_real())
        self._constant("d", d, dtype)

    def _apply_cols(self, h: Tensor) -> Tensor:
        if self.d is None:
            return h.real
        d = self.d.unsqueeze(1)
        return d.real * h.real - d.imag * h.imag

    def _reference_matmul(self, x: Tensor) -> Tensor:
        d = self.d if self.d is not None else torch.ones(self.in_features, dtype=self.in_dtype)
        return torch.stack([(d[i] * x[:, i]).real for i in range(self.in_features)], -1)

    def sparse_factors(self) -> list[Factor]:
        out = [] if self.d is None else Diagonal(self.d, self.in_dtype).sparse_factors()
        return out + [REAL_PART]

    def row_flops(self) -> int:
        return 0 if self.d is None else 3 * self.in_features


class SparseMatrix(Operator):
    """``y = S x`` for a few explicit entries ``S[rows[e], cols[e]] = vals[e]`` (e.g. periodic corners)."""

    rows: Tensor
    cols: Tensor
    vals: Tensor

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int],
                 dtype: torch.dtype) -> None:
        super().__init__(shape[1], shape[0], in_dtype=dtype)
        self._constant("rows", torch.as_tensor(rows, dtype=torch.long))
        self._constant("cols", torch.as_tensor(cols, dtype=torch.long))
        self._constant("vals", torch.as_tensor(vals), dtype)

    def _apply_cols(self, h: Tensor) -> Tensor:
        contrib = self.vals.unsqueeze(1) * h.index_select(0, self.cols)  # (nnz, cols)
        return h.new_zeros(self.out_features, h.shape[1]).index_add(0, self.rows, contrib)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        y = [x.new_zeros(x.shape[0]) for _ in range(self.out_features)]
        for r, c, v in zip(self.rows.tolist(), self.cols.tolist(), self.vals):
            y[r] = y[r] + v * x[:, c]
        return torch.stack(y, -1)

    def sparse_factors(self) -> list[Factor]:
        return [_coo(self.rows, self.cols, self.vals, (self.out_features, self.in_features))]

    def row_flops(self) -> int:
        return (8 if self.in_dtype.is_complex else 2) * self.vals.numel()


class LayerOperator(Operator):
    """Any :class:`~deftly.StructuredLinear` (bias ignored) as an operator; FLOPs from its ``flops()``.

    The one place where a learned layer joins an operator product (its parameters stay trainable)."""

    layer: StructuredLinear

    def __init__(self, layer: StructuredLinear) -> None:
        if not isinstance(layer, StructuredLinear):
            raise TypeError(f"LayerOperator: layer must be a deftly.StructuredLinear (e.g. from "
                            f"deftly.make(...)), got {type(layer).__name__}; an Operator is used as is")
        wd = layer.weight_dtype
        out = layer.to_dense().dtype
        super().__init__(layer.in_features, layer.out_features, in_dtype=wd, out_dtype=out)
        self.layer = layer
        for qual, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            self._exact[f"layer.{qual}"] = exact_copy(t)

    def _apply_cols(self, h: Tensor) -> Tensor:
        return self.layer._matmul(h.T).T

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return self.layer._reference_matmul(x)

    def sparse_factors(self) -> list[Factor]:
        return [self.layer.to_dense().detach().cpu().to_sparse()]

    def row_flops(self) -> int:
        return self.layer.flops()


class Sum(Operator):
    """``y = sum_i ops[i] x`` (same shapes and dtypes)."""

    ops: nn.ModuleList

    def __init__(self, ops: Sequence[Operator | StructuredLinear]) -> None:
        terms = _as_operators(ops)
        if not terms:
            raise ValueError("Sum: needs at least one operator")
        a = terms[0]
        for b in terms[1:]:
            if (b.in_features, b.out_features, b.in_dtype, b.out_dtype) != \
                    (a.in_features, a.out_features, a.in_dtype, a.out_dtype):
                raise ValueError("Sum: operators must share in/out sizes and dtypes")
        super().__init__(a.in_features, a.out_features, in_dtype=a.in_dtype, out_dtype=a.out_dtype)
        self.ops = nn.ModuleList(terms)

    def _apply_cols(self, h: Tensor) -> Tensor:
        first, *rest = _operators(self.ops)
        y = first._apply_cols(h)
        for op in rest:
            y = y + op._apply_cols(h)
        return y

    def _reference_matmul(self, x: Tensor) -> Tensor:
        first, *rest = _operators(self.ops)
        y = first._reference_matmul(x)
        for op in rest:
            y = y + op._reference_matmul(x)
        return y

    def to_dense(self) -> Tensor:
        first, *rest = _operators(self.ops)
        y = first.to_dense()
        for op in rest:
            y = y + op.to_dense()
        return y

    def sparse_factors(self) -> list[Factor]:
        return [self.to_dense().cpu().to_sparse()]

    def row_flops(self) -> int:
        add = 2 if self.out_dtype.is_complex else 1
        adds = (len(self.ops) - 1) * self.out_features * add
        return sum(op.row_flops() for op in _operators(self.ops)) + adds


def unit_roots(n: int, exponents: Tensor, sign: int) -> Tensor:
    """``exp(sign 2 pi i e / n)`` in complex128 with ``e`` reduced mod ``n`` first (exact angles)."""
    e = torch.remainder(exponents.to(torch.long), n).to(torch.float64)
    ang = (sign * 2.0 * math.pi / n) * e
    return torch.polar(torch.ones_like(ang), ang)
