"""The registry of structures: each structure module registers its class on import.

``make(name, in_features, out_features, **params)`` builds a layer by name, ``structures()`` lists the
names, ``get(name)`` returns the class. Generic code (tests, ``deftly show``, surgery) walks this
registry and never grows an if/elif chain over structure names.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import StructuredLinear

__all__ = ["get", "make", "register", "structures"]

_REGISTRY: dict[str, type[StructuredLinear]] = {}
_BUILTINS_LOADED = False


def register(cls: type[StructuredLinear]) -> type[StructuredLinear]:
    """Class decorator: add a :class:`StructuredLinear` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, StructuredLinear)):
        raise TypeError(f"register: {cls!r} is not a StructuredLinear subclass")
    if not cls.name:
        raise ValueError(f"register: {cls.__name__} has no `name` class attribute")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"register: structure name {cls.name!r} is already taken by {other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        importlib.import_module("deftly.layers")
        _BUILTINS_LOADED = True


def structures() -> list[str]:
    """Names of every registered structure, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[StructuredLinear]:
    """The class registered under ``name``; unknown names raise ``ValueError`` listing the choices."""
    _load_builtins()
    if not isinstance(name, str):
        raise TypeError(f"structure name must be a str, got {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown structure {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}.{hint}"
                         ) from None


def make(name: str, in_features: int, out_features: int, bias: bool = True, *, device: Any = None,
         dtype: Any = None, **params: Any) -> StructuredLinear:
    """Build the structure ``name`` as a drop-in for ``nn.Linear(in_features, out_features, bias)``."""
    cls = get(name)
    sig = inspect.signature(cls.__init__)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not accepts_kwargs:
        valid = [p for p in sig.parameters if p not in ("self", "in_features", "out_features", "bias",
                                                         "device", "dtype")]
        bad = sorted(set(params) - set(valid))
        if bad:
            import difflib

            close = [m for b in bad for m in difflib.get_close_matches(b, valid, n=1)]
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"structure {name!r} has no parameter {', '.join(map(repr, bad))}; "
                             f"its parameters are: {', '.join(valid) or '(none)'}.{hint}")
    return cls(in_features, out_features, bias, device=device, dtype=dtype, **params)
