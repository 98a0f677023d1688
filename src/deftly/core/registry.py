"""The registry of structures: each structure module registers its class on import.

``make(name, in_features, out_features, **params)`` builds a layer by name, ``structures()`` lists the
names, ``get(name)`` returns the class. Generic code (tests, ``deftly show``, surgery) walks this
registry and never grows an if/elif chain over structure names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .base import StructuredLinear

__all__ = ["get", "make", "register", "structures"]

_REGISTRY: dict[str, type[StructuredLinear]] = {}
_BUILTINS_LOADED = False
# imports the built-in structures (they register themselves); set by the package root, which sits above
# ``deftly.layers``: core names no package above it, so the dependency points down (inversion)
_BUILTIN_LOADER: list[Callable[[], object]] = []


def set_builtin_loader(load: Callable[[], object]) -> None:
    """Called once by ``deftly/__init__.py``: ``load()`` imports the built-in structure modules."""
    _BUILTIN_LOADER[:] = [load]


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
    if not _BUILTINS_LOADED and _BUILTIN_LOADER:
        _BUILTINS_LOADED = True  # first: a structure module that asks the registry while loading
        try:
            _BUILTIN_LOADER[0]()
        except BaseException:
            _BUILTINS_LOADED = False  # retried on the next call, with the import's own error now
            raise


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
