"""The base of every fixed transform: :class:`Operator`, a linear map built from sparse factors.

An :class:`Operator` is an ``nn.Module`` with no parameters of its own and no bias (its data are buffers),
not a :class:`deftly.StructuredLinear`: it is not learned, it is an exact map whose fast path *is* its
factorisation. It has the linear-layer surface the rest of the library reads — ``in_features`` /
``out_features``, ``forward`` on ``(*, in_features)`` inputs, ``to_dense()``, ``reference_forward``,
``flops()``, ``num_params()``, ``weight_dtype`` and ``bias = None`` — and each factor of
:mod:`deftly.transforms.operators` implements four methods: ``_apply_cols``, ``_reference_matmul``,
``sparse_factors`` and ``row_flops``. A learned :class:`~deftly.StructuredLinear` joins an operator product
through :class:`~deftly.transforms.operators.LayerOperator`.

**Layout.** Internally every operator maps batch-last columns ``h: (n_in, cols) -> (n_out, cols)``
(``_apply_cols``), so a chain of factors never transposes; ``forward`` transposes once on the way in and
out.

**Three independent paths.** ``_apply_cols`` (fast: reshapes and batched elementwise ops),
``_reference_matmul`` (slow loops over pairs/blocks/entries) and :meth:`Operator.sparse_factors` — the
explicit list of sparse COO matrices whose product is the operator; ``to_dense()`` multiplies them out and
never calls the fast path, so tests comparing the three are not circular.

**Casts and moves.** Operators are ordinary modules: ``.to(device)``, ``.cuda()``, ``.to(dtype)``,
``.double()``, ``.float()``, ``state_dict`` and ``copy.deepcopy`` work. An operator has one *precision*
(single or double; half / bfloat16 for purely real ones) and keeps its *kind*: a cast changes the
precision of every factor, real stays real and complex stays complex. So ``dft(n).to(torch.complex64)``
is the complex64 DFT, and so is ``dft(n).to(torch.float32)`` (as ``dft(n, dtype=torch.float32)``: a
real dtype names the precision of a complex operator); ``.double()`` gives complex128. A real operator
(real inputs: Hadamard, DCT, derivatives, real circulants) refuses a complex dtype (its factors take
real parts), and an operator with complex factors refuses float16 / bfloat16 (torch has no complex
bfloat16) — both with a ``TypeError`` naming the fix. Every constant (twiddles, diagonals, small dense
blocks, index maps) is remembered exactly (float64 / complex128, on the CPU) when the operator is built,
and a cast recomputes the buffers from it: ``dft(n, dtype=torch.complex64).to(torch.complex128)`` is
bit-for-bit ``dft(n)``, and ``.to("meta")`` then ``.to_empty(device="cpu")`` gives the operator back.
A constant changed in place since (a trained ``LayerOperator``) is cast from its current value instead.
The mechanics are in :mod:`deftly.transforms.casting`.

**FLOPs** are the real floating-point operations the fast path executes: real add or multiply 1, complex
add 2, complex x complex multiply 6, real x complex multiply 2, a multiply-add 2 (8 if complex). Gathers,
casts and taking a real part cost 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.base import check_int
from .casting import cast, exact_copy

__all__ = ["REAL_PART", "Factor", "Operator"]

#: marker in :meth:`Operator.sparse_factors`: take the real part (the map is real-linear on real inputs)
REAL_PART = "real_part"

#: one entry of :meth:`Operator.sparse_factors`: a sparse COO matrix or :data:`REAL_PART`
Factor = Tensor | str


class Operator(nn.Module):
    """A fixed linear operator ``(*, in_features) -> (*, out_features)`` with buffers, no parameters.

    Subclasses implement ``_apply_cols(h)`` on batch-last columns, ``_reference_matmul(x)`` on rows,
    ``sparse_factors()`` and ``row_flops()``.
    """

    #: an operator adds no bias (read by code that treats it like ``nn.Linear``)
    bias: ClassVar[None] = None

    in_features: int
    out_features: int
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    #: qualified tensor name -> its exact value (float64 / complex128 / integer, CPU): casts start here
    _exact: dict[str, Tensor]

    def __init__(self, in_features: int, out_features: int, *, in_dtype: torch.dtype,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_int(owner, "in_features", in_features)
        self.out_features = check_int(owner, "out_features", out_features)
        self.in_dtype = in_dtype
        self.out_dtype = out_dtype if out_dtype is not None else in_dtype
        self._exact = {}

    def _constant(self, name: str, value: Tensor | None, dtype: torch.dtype | None = None) -> None:
        """Register the non-persistent buffer ``name`` = ``value`` in ``dtype`` (default: its own) and
        remember ``value`` exactly, so that casts recompute the buffer instead of re-rounding it."""
        if value is None:
            self.register_buffer(name, None, persistent=False)
            return
        dtype = value.dtype if dtype is None else dtype
        self.register_buffer(name, value.to(dtype), persistent=False)
        self._exact[name] = exact_copy(value, dtype)

    # ------------------------------------------------------------------ to implement
    def _apply_cols(self, h: Tensor) -> Tensor:  # (in, cols) -> (out, cols)
        raise NotImplementedError

    def _reference_matmul(self, x: Tensor) -> Tensor:  # (batch, in) -> (batch, out)
        raise NotImplementedError

    def sparse_factors(self) -> list[Factor]:
        """Sparse COO matrices (or :data:`REAL_PART`) whose product, first factor applied first, is the
        operator."""
        raise NotImplementedError

    def row_flops(self) -> int:
        """Exact real FLOPs of the fast path per input row."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the map
    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype inputs are taken in (real inputs of a complex operator are cast to it)."""
        return self.in_dtype

    def _matmul(self, x: Tensor) -> Tensor:  # (batch, in) -> (batch, out)
        return self._apply_cols(x.to(self.in_dtype).T.contiguous()).T

    def _check_input(self, x: Tensor) -> Tensor:
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
        first = next(itertools.chain(self.parameters(), self.buffers()), None)
        if first is not None and x.device != first.device:
            raise ValueError(f"{owner}: input is on device {x.device} but the operator is on {first.device}; "
                             f"move the input (x.to({str(first.device)!r})) or the operator "
                             f"(op.to({str(x.device)!r}))")
        if x.dim() == 0:
            raise ValueError(f"{owner}: input is a 0-d tensor; expected shape (*, {self.in_features})")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{owner}: input has last dimension {x.shape[-1]} but in_features={self.in_features} "
                f"(input shape {tuple(x.shape)}); pass inputs of shape (*, {self.in_features}) "
                f"or build the operator with in_features={x.shape[-1]}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{owner}: input dtype {x.dtype} is not floating point; "
                            f"cast it first, e.g. x.to({self.in_dtype})")
        wd = self.in_dtype
        if x.dtype != wd:
            if wd.is_complex and not x.is_complex():
                return x.to(wd)
            if not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"{owner}: input dtype {x.dtype} does not match the operator's {wd}; "
                                f"cast the input (x.to({wd})) or the operator (op.to({x.dtype}))")
        return x

    def _apply_rows(self, x: Tensor, matmul: Callable[[Tensor], Tensor]) -> Tensor:
        x = self._check_input(x)
        lead = x.shape[:-1]
        return matmul(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)`` through the sparse factors (real inputs of a complex
        operator are cast to its dtype)."""
        return self._apply_rows(x, self._matmul)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same map through the slow reference multiply (for tests)."""
        return self._apply_rows(x, self._reference_matmul)

    def to_dense(self) -> Tensor:
        """The ``(out, in)`` matrix as the product of :meth:`sparse_factors` (never the fast path),
        multiplied on the CPU, returned on the operator's device."""
        D = torch.eye(self.in_features, dtype=self.in_dtype)
        for f in self.sparse_factors():
            if isinstance(f, str):
                assert f == REAL_PART
                D = D.real
                continue
            dt = torch.promote_types(f.dtype, D.dtype)
            D = torch.sparse.mm(f.to(dt), D.to(dt))
        return D.to(device=self._device(), dtype=self.out_dtype)

    # ------------------------------------------------------------------ casts and moves
    def _device(self) -> torch.device:
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return torch.device("cpu")

    def precision(self) -> torch.dtype:
        """The real dtype of the operator's precision (float64 for a complex128 operator)."""
        return self.in_dtype.to_real() if self.in_dtype.is_complex else self.in_dtype

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Operator:
        """``nn.Module``'s hook behind ``.to`` / ``.double()`` / ``.cuda()`` / ``.to_empty()``: one precision
        and device for the whole operator, constants recomputed (:func:`~deftly.transforms.casting.cast`)."""
        return cast(self, fn)

    # ------------------------------------------------------------------ counts
    def flops(self, batch: int = 1) -> int:
        """Real FLOPs of one forward of ``batch`` rows through the fast path."""
        return batch * self.row_flops()

    def num_params(self) -> int:
        """Learned entries (0 unless the operator holds a learnable layer, see ``LayerOperator``)."""
        return sum(p.numel() for p in self.parameters())

    def compression(self) -> float:
        """Dense FLOPs per row / this operator's FLOPs per row."""
        cplx = self.in_dtype.is_complex or self.out_dtype.is_complex
        return (8 if cplx else 2) * self.in_features * self.out_features / max(self.row_flops(), 1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"flops/row={self.row_flops()} ({self.compression():.1f}x fewer than dense)")
