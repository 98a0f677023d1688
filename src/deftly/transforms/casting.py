"""Casts and moves of :class:`~deftly.transforms.base.Operator` trees (``.to``, ``.double()``,
``.cuda()``, ``.to_empty()``): the rules are in the :mod:`~deftly.transforms.base` docstring.

``nn.Module._apply(fn)`` hands every tensor to ``fn`` separately, which for an operator would cast its real
diagonals to complex (or its complex twiddles to real) and re-round constants that were rounded once
already. Here ``fn`` is only *read*: applied to two probe tensors (one real, one complex, in the operator's
precision) it says which precision and device are wanted; the whole tree is then set to that precision,
each remembered constant recomputed from its exact value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeGuard, TypeVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # base.py imports this module at run time
    from .base import Operator

    OpT = TypeVar("OpT", bound=Operator)

__all__ = ["cast", "exact_copy", "retype"]

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The exact (float64 / complex128) dtype of ``dtype``'s kind; integer dtypes unchanged."""
    if dtype.is_complex:
        return torch.complex128
    return torch.float64 if dtype.is_floating_point else dtype


def exact_copy(value: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` as a CPU float64 / complex128 (integer: unchanged) copy, of the kind of ``dtype``."""
    return value.detach().to("cpu").to(_wide(value.dtype if dtype is None else dtype), copy=True)


def _is_operator(module: nn.Module) -> TypeGuard[Operator]:
    return isinstance(getattr(module, "_exact", None), dict) and hasattr(module, "in_dtype")


def _get_tensor(module: nn.Module, qualname: str) -> Tensor | None:
    prefix, _, name = qualname.rpartition(".")
    mod = module.get_submodule(prefix) if prefix else module
    t = mod._parameters.get(name)
    return t if t is not None else mod._buffers.get(name)


def _has_complex(op: nn.Module) -> bool:
    return any(_is_operator(m) and (m.in_dtype.is_complex or m.out_dtype.is_complex) for m in op.modules()) \
        or any(t.is_complex() for t in op.buffers())


def cast(op: OpT, fn: Callable[[Tensor], Tensor]) -> OpT:
    """Apply ``nn.Module``'s conversion ``fn`` to the operator ``op`` as one precision and device; anything
    else ``fn`` does that keeps dtype and device (e.g. ``share_memory_``) is applied as is."""
    dev, real = op._device(), op.precision()
    cplx = _COMPLEX_OF.get(real)
    with warnings.catch_warnings():  # the probe of a complex -> real cast warns
        warnings.simplefilter("ignore")
        pr = fn(torch.zeros(1, dtype=real, device=dev))
        pc = fn(torch.zeros(1, dtype=cplx, device=dev)) if cplx is not None else None
    new = pr.dtype if pr.dtype != real else (pc.dtype if pc is not None and pc.dtype != cplx else None)
    if new is None and pr.device == dev:
        def keep(t: Tensor) -> Tensor:
            out = fn(t)
            return out if (out.dtype, out.device) == (t.dtype, t.device) else t

        for m in op.modules():
            nn.Module._apply(m, keep, recurse=False)
        return op
    name = type(op).__name__
    if new is not None and new.is_complex and not op.in_dtype.is_complex:
        raise TypeError(f"{name}: cannot cast a real operator ({op.in_dtype} inputs) to {new}: its "
                        f"factors are real-linear only (they take real parts); cast it to a real dtype of "
                        f"the precision you want (.to({new.to_real()})) and apply it to the real and "
                        f"imaginary parts of complex inputs separately")
    target = real if new is None else (new.to_real() if new.is_complex else new)
    if not target.is_floating_point:
        raise TypeError(f"{name}: cannot cast to {new}: an operator needs a floating or complex dtype")
    if target not in _COMPLEX_OF and _has_complex(op):
        raise TypeError(f"{name}: cannot cast to {new}: the operator has complex factors and torch has no "
                        f"complex counterpart of {target}; use torch.float32 / torch.complex64 (or, for a "
                        f"power-of-two FFT in bfloat16, Radix2.apply_real_pairs)")
    retype(op, target, pr.device)
    return op


def retype(op: Operator, real: torch.dtype, device: torch.device) -> None:
    """Set the precision (``real`` and its complex counterpart) and device of the operator ``op`` and every
    factor in it, recomputing each remembered constant from its exact value (a constant changed in place
    since it was remembered is cast from its current value)."""
    cplx = _COMPLEX_OF.get(real)
    exact = {}
    for qual, ex in op._exact.items():
        t = _get_tensor(op, qual)
        if t is not None:
            exact[id(t)] = ex

    def kind(dt: torch.dtype) -> torch.dtype:
        if dt.is_complex:
            if cplx is None:  # cast() refuses this first, naming the fix
                raise TypeError(f"{type(op).__name__}: {real} has no complex counterpart in torch")
            return cplx
        return real if dt.is_floating_point else dt

    def convert(t: Tensor) -> Tensor:
        ex = exact.get(id(t))
        if ex is not None and (t.is_meta or torch.equal(ex.to(t.dtype), t.detach().to("cpu"))):
            return ex.to(device=device, dtype=kind(t.dtype))
        if t.is_meta and device.type != "meta":  # nothing to copy (to_empty of an unknown tensor)
            return torch.empty(t.shape, dtype=kind(t.dtype), device=device)
        return t.to(device=device, dtype=kind(t.dtype))

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if _is_operator(child):
                retype(child, real, device)
            elif type(child) in (nn.ModuleList, nn.ModuleDict, nn.Sequential):
                walk(child)
                nn.Module._apply(child, convert, recurse=False)
            else:  # e.g. the layer of a LayerOperator: its own _apply runs, with the exact values
                child._apply(convert)

    walk(op)
    nn.Module._apply(op, convert, recurse=False)
    op.in_dtype, op.out_dtype = kind(op.in_dtype), kind(op.out_dtype)
