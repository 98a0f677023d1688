"""Shared pieces of the mixers: the channel-mixing linear factory and integer checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def check_pos_int(owner: str, name: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name}={value} is invalid; it must be >= 1. {fix}")
    return value


def linear_factory(owner: str, structure: str, structure_kwargs: dict | None, linear: LinearFactory | None,
                   bias: bool, device: Any, dtype: Any) -> LinearFactory:
    """``(in, out) -> module``: the user's ``linear`` if given, else ``deftly.make(structure, in, out,
    bias, **structure_kwargs)`` (any registered structure; unknown names list the choices)."""
    if linear is not None:
        if not callable(linear):
            raise TypeError(f"{owner}: linear={linear!r} must be a callable (in_features, out_features) -> "
                            f"nn.Module, e.g. lambda i, o: nn.Linear(i, o)")
        if structure_kwargs:
            raise ValueError(f"{owner}: pass either linear= or structure_kwargs=, not both (linear builds the "
                             f"layers itself)")
        return linear
    import deftly

    deftly.get(structure)  # ValueError listing the registered structures (with a close match)
    kw = dict(structure_kwargs or {})

    def make(i: int, o: int) -> nn.Module:
        return deftly.make(structure, i, o, bias, device=device, dtype=dtype, **kw)

    return make
