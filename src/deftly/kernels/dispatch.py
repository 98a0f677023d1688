"""The public controls of the backend dispatch (the engine, used by ``StructuredLinear.forward``, is
:mod:`deftly.core.dispatch`; see there for how the choice is made, cached and invalidated).

* :func:`backends` — what a structure can run: ``"native"`` (its own ``_matmul``), the kernels its class
  declares (``kernels = {name: KernelSpec(...)}`` in the layer module), ``"dense"``;
* :func:`set_backend` / :func:`use_backend` / ``layer.kernel_backend`` — forcing (a globally forced
  backend that a structure lacks, or that cannot run an input, falls back to the static choice; an
  unknown name is a ``ValueError``);
* :func:`tune` — timing-based choice, opt-in (``DEFTLY_TUNE=1`` in the environment does the same);
* :func:`decisions` / :func:`timings` / :func:`lookup` / :func:`clear_cache` — what was decided.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import TYPE_CHECKING, Any

import torch

from ..core import dispatch as _core
from ..core.dispatch import (
    AUTO,
    DENSE,
    NATIVE,
    TUNED_DTYPES,
    KernelSpec,
    choose,
    decisions,
    dense_weight,
    matmul,
    timings,
    tune,
)
from ..core.registry import get as _get
from ..core.registry import structures as _structures
from . import _transpose
from . import butterfly as _butterfly

if TYPE_CHECKING:
    from ..core.base import StructuredLinear

__all__ = [
    "AUTO",
    "TUNED_DTYPES",
    "KernelSpec",
    "backends",
    "choose",
    "clear_cache",
    "decisions",
    "default_backend",
    "dense_weight",
    "get_backend",
    "lookup",
    "matmul",
    "register_kernel",
    "set_backend",
    "timings",
    "tune",
    "use_backend",
]


def _cls(structure: Any) -> type[StructuredLinear]:
    if isinstance(structure, str):
        return _get(structure)
    return structure if isinstance(structure, type) else type(structure)


def backends(structure: Any, x: torch.Tensor | None = None) -> list[str]:
    """Backend names of ``structure`` (a name, class or layer): ``native``, its kernels, ``dense``; with an
    example input ``x``, only those usable for it (e.g. ``"triton"`` needs a CUDA tensor)."""
    own = [n for n, s in _cls(structure).kernels.items() if x is None or s.usable(x)]
    return [NATIVE, *own, DENSE]


def default_backend(structure: Any) -> str:
    """The first kernel a structure declares as a default (at some batch size), else ``"native"``."""
    return next((n for n, s in _cls(structure).kernels.items() if s.default), NATIVE)


def _check_name(name: str, structure: str | None) -> None:
    if not isinstance(name, str):
        raise TypeError(f"kernel backend must be a str or None, got {name!r}")
    if structure is not None:
        known = [*backends(structure), AUTO]
    else:
        known = sorted({NATIVE, DENSE, AUTO} | {b for s in _structures() for b in _get(s).kernels})
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise ValueError(f"unknown kernel backend {name!r}" + (f" for {structure!r}" if structure else "")
                         + f"; choose one of: {', '.join(known)}"
                         + (f". Did you mean {close[0]!r}?" if close else ""))


def set_backend(name: str | None, structure: str | None = None) -> None:
    """Force ``name`` (``"auto"``/``None`` to undo) for ``structure`` or, with ``structure=None``, all."""
    if name is not None and name != AUTO:
        _check_name(name, structure)
    elif structure is not None:
        _get(structure)  # an unknown structure name is an error, with suggestions
    _core.set_forced(name, structure)


def get_backend(structure: str | None = None) -> str:
    """The backend forced for ``structure`` (or for all), ``"auto"`` when none is."""
    return _core.forced(structure)


@contextlib.contextmanager
def use_backend(name: str, structure: str | None = None):
    """``with use_backend("dense"): ...`` forces a backend inside the block."""
    if name is not None and name != AUTO:
        _check_name(name, structure)
    with _core.forcing(name, structure):
        yield


def clear_cache() -> None:
    """Forget every decision, timing and cached weight (dense weights, butterfly blocks, transposes)."""
    _core.clear_cache()
    _butterfly.clear_cache()
    _transpose.clear_transposes()


def lookup(layer: Any, batch: int, dtype: torch.dtype, mode: str, device: str = "cpu") -> str | None:
    """The decision recorded for ``layer``'s shape at this batch size, dtype, device type and mode
    (``"infer"``/``"train"``), or None if no layer of that shape has run it yet."""
    bucket = 1 if batch <= 1 else 1 << (batch - 1).bit_length()
    key = (layer.name, layer.in_features, layer.out_features, tuple(sorted(layer.hparams().items())),
           bucket, dtype, device, mode)
    hit = _core._DECISIONS.get(key)
    return hit[0] if hit is not None else None


def register_kernel(structure: Any, name: str, spec: KernelSpec) -> None:
    """Add (or replace) the kernel ``name`` of a structure class: ``spec.fn(x, *layer._kernel_args())``."""
    cls = _cls(structure)
    if name in (NATIVE, DENSE, AUTO) or not isinstance(name, str):
        raise ValueError(f"register_kernel: {name!r} is reserved or not a str; pick another backend name")
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"register_kernel: spec must be a deftly.kernels.KernelSpec, got {type(spec).__name__}")
    cls.kernels = {**cls.kernels, name: spec}
    _core.clear_cache()


class _DefaultNames:
    """``name -> default kernel`` lookups (the benchmark suite's untuned-default column)."""

    def get(self, name: str, fallback: str = NATIVE) -> str:
        try:
            return default_backend(name)
        except ValueError:
            return fallback


_DEFAULT = _DefaultNames()
