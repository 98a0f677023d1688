"""Dual numbers as 2x2 matrices: forward-mode derivatives carried by matrix multiplication.

A dual number ``a + b ε`` with ``ε² = 0`` is represented by the matrix ``a I + b E``,
``E = [[0, 1], [0, 0]]``, i.e. ``[[a, b], [0, a]]``. Sums and products of these matrices are sums and
products of dual numbers, so any polynomial or analytic matrix function evaluated at ``a I + E`` gives
``f(a) I + f'(a) E`` — the derivative appears in the top-right entry without being coded (matrix functions
of a Jordan block: Higham, "Functions of Matrices", SIAM 2008, thm. 1.7 / eq. (1.4); the block form
``f([[A, E], [0, A]]) = [[f(A), L_f(A, E)], [0, f(A)]]`` gives the Fréchet derivative, Higham thm. 3.6).

Conventions: a *dual tensor* is a tensor of shape ``(*, 2, 2)`` holding ``[[a, b], [0, a]]`` for every
entry of ``a`` (primal) and ``b`` (tangent). Elementwise products are 2x2 matmuls (:func:`mul`); linear
maps act on every entry of the 2x2 (:func:`linear`, :func:`affine`); analytic functions are matrix
functions of the 2x2 blocks (:func:`exp`, :func:`sin`, :func:`cos`, :func:`tanh`, :func:`reciprocal`,
:func:`polyval`). :func:`layer_jvp` pushes ``x + ε v`` through any affine layer (every deftly structure)
and returns ``(layer(x), J v)``; :func:`frechet` differentiates a matrix function in a direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "EPS",
    "affine",
    "cos",
    "derivative",
    "dual",
    "eps",
    "exp",
    "frechet",
    "layer_jvp",
    "matmul",
    "mul",
    "polyval",
    "primal",
    "reciprocal",
    "sin",
    "tangent",
    "tanh",
    "to_block",
]


def eps(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """``E = [[0, 1], [0, 0]]``, the nilpotent unit (``E @ E == 0``)."""
    return torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=dtype, device=device)


EPS = eps()


def dual(a, b=None) -> Tensor:
    """``a I + b E`` entrywise: ``(*,)`` and ``(*,)`` -> ``(*, 2, 2)``; ``b`` defaults to 0."""
    a = torch.as_tensor(a)
    b = torch.zeros_like(a) if b is None else torch.as_tensor(b, dtype=a.dtype, device=a.device)
    a, b = torch.broadcast_tensors(a, b)
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([a, b], -1), torch.stack([z, a], -1)], -2)


def primal(X: Tensor) -> Tensor:
    return X[..., 0, 0]


def tangent(X: Tensor) -> Tensor:
    return X[..., 0, 1]


def _check(X: Tensor, owner: str) -> Tensor:
    if not isinstance(X, Tensor) or X.dim() < 2 or X.shape[-2:] != (2, 2):
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise ValueError(f"dual.{owner}: expected a dual tensor of shape (*, 2, 2), got {shape}; "
                         f"build one with dual.dual(a, b)")
    return X.contiguous()  # torch.linalg's matrix functions want contiguous 2x2 blocks


def mul(X: Tensor, Y: Tensor) -> Tensor:
    """Entrywise dual product ``(a + b ε)(c + d ε) = ac + (ad + bc) ε``, as a 2x2 matmul."""
    _check(X, "mul")
    _check(Y, "mul")
    return X @ Y


def matmul(A: Tensor, B: Tensor) -> Tensor:
    """Dual matrix product: ``A (m, k, 2, 2)``, ``B (k, n, 2, 2)`` -> ``(m, n, 2, 2)``; the tangent is
    ``A' B + A B'`` (product rule) because ``E² = 0``."""
    _check(A, "matmul")
    _check(B, "matmul")
    return torch.einsum("mkab,knbc->mnac", A, B)


def _eye_like(X: Tensor) -> Tensor:
    return torch.eye(2, dtype=X.dtype, device=X.device).expand_as(X)


def polyval(coeffs: Sequence[float], X: Tensor) -> Tensor:
    """``p(X) = c_0 X^d + ... + c_d I`` by Horner's rule with 2x2 matmuls (numpy.polyval's order)."""
    X = _check(X, "polyval")
    I = _eye_like(X)
    R = coeffs[0] * I
    for c in coeffs[1:]:
        R = R @ X + c * I
    return R


def exp(X: Tensor) -> Tensor:
    """``exp`` of every 2x2 block (``torch.linalg.matrix_exp``): tangent ``exp(a) b``."""
    X = _check(X, "exp")
    return torch.linalg.matrix_exp(X)


def _trig(X: Tensor, kind: str) -> Tensor:
    cd = X.dtype if X.is_complex() else X.dtype.to_complex()
    iX = 1j * X.to(cd)
    ep, em = torch.linalg.matrix_exp(iX), torch.linalg.matrix_exp(-iX)
    out = (ep - em) / 2j if kind == "sin" else (ep + em) / 2
    return out if X.is_complex() else out.real


def sin(X: Tensor) -> Tensor:
    """``sin(X) = (exp(iX) - exp(-iX)) / 2i`` on every 2x2 block."""
    X = _check(X, "sin")
    return _trig(X, "sin")


def cos(X: Tensor) -> Tensor:
    """``cos(X) = (exp(iX) + exp(-iX)) / 2`` on every 2x2 block."""
    X = _check(X, "cos")
    return _trig(X, "cos")


def reciprocal(X: Tensor) -> Tensor:
    """``X^{-1}`` of every block: tangent ``-b / a^2``."""
    X = _check(X, "reciprocal")
    return torch.linalg.inv(X)


def tanh(X: Tensor) -> Tensor:
    """``tanh(X) = (exp(2X) + I)^{-1} (exp(2X) - I)`` on every 2x2 block."""
    X = _check(X, "tanh")
    e2 = torch.linalg.matrix_exp(2 * X)
    I = _eye_like(X)
    return torch.linalg.solve(e2 + I, e2 - I)


def affine(fn: Callable[[Tensor], Tensor], X: Tensor, offset: Tensor | None = None) -> Tensor:
    """Apply an affine map ``fn(x) = L x + offset`` along the feature axis of a dual vector batch.

    ``X (*, n, 2, 2) -> (*, m, 2, 2)``: the linear part ``L`` acts on each of the four entries of the
    2x2 (it commutes with ``I`` and ``E``) and the constant ``offset`` multiplies ``I`` only.
    ``offset=None`` means ``fn(0)``, computed once.
    """
    X = _check(X, "affine")
    Xf = X.movedim(-2, 0).movedim(-1, 1)  # (2, 2, *, n)
    Y = fn(Xf)  # (2, 2, *, m): L x_ab + offset
    if offset is None:
        offset = fn(X.new_zeros(1, X.shape[-3]))[0]  # fn(0): (m,)
    I = torch.eye(2, dtype=Y.dtype, device=Y.device).reshape(2, 2, *([1] * (Y.dim() - 2)))
    Y = Y - offset + I * offset  # keep the constant on the diagonal entries only
    return Y.movedim(0, -1).movedim(0, -1).contiguous()  # (*, m, 2, 2)


def layer_jvp(layer: nn.Module, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(layer(x), J_x layer · v)`` by pushing the dual vector ``x + ε v`` through the (affine) layer."""
    Y = affine(layer, dual(x, v))
    return primal(Y), tangent(Y)


def to_block(A: Tensor, E: Tensor) -> Tensor:
    """The dual matrix ``A + ε E`` as the ``(2n, 2n)`` block matrix ``[[A, E], [0, A]]``
    (``I_2 ⊗ A + E_2 ⊗ E``): block products are dual products."""
    Z = torch.zeros_like(A)
    return torch.cat([torch.cat([A, E], -1), torch.cat([Z, A], -1)], -2)


def frechet(f: Callable[[Tensor], Tensor], A: Tensor, E: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(A), L_f(A, E))`` from ``f([[A, E], [0, A]])`` for a matrix function ``f`` (e.g.
    ``torch.linalg.matrix_exp``, a polynomial in matmuls)."""
    n = A.shape[-1]
    F = f(to_block(A, E))
    return F[..., :n, :n], F[..., :n, n:]


def derivative(f: Callable[[Tensor], Tensor], a) -> tuple[Tensor, Tensor]:
    """``(f(a), f'(a))`` for a function of dual tensors (e.g. :func:`exp`, ``lambda X: polyval(c, X)``)."""
    Y = f(dual(torch.as_tensor(a), torch.ones_like(torch.as_tensor(a))))
    return primal(Y), tangent(Y)
