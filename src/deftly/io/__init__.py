"""Reading and writing: ``deftly.save`` / ``deftly.load`` / ``deftly.densify`` (structured models as safetensors + JSON, no pickle: :mod:`~deftly.io.persist`) and
training checkpoints (``save_checkpoint`` / ``load_checkpoint``: :mod:`~deftly.io.checkpoint`).
Submodules load on first use. Atomic writes and hashes live in :mod:`deftly.core.files` (re-exported)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CheckpointError", "DeftlyLoadError", "atomic_write_bytes", "densify", "load", "load_checkpoint",
           "save", "save_checkpoint"]

_WHERE = {"CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
          "DeftlyLoadError": "persist", "densify": "persist", "load": "persist",
          "save": "persist"}


def __getattr__(name: str) -> Any:
    if name == "atomic_write_bytes":
        from ..core.files import atomic_write_bytes

        return atomic_write_bytes
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
