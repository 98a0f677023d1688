"""deftly: structured matrices as drop-in ``nn.Linear`` layers.

Monarch, butterfly, Block Tensor-Train, low-rank, block-diagonal, banded, Kronecker and more, each with
``to_dense()``, exact parameter and FLOP counts, a structure-aware init and a slow reference multiply.

>>> import deftly
>>> layer = deftly.make("monarch", 1024, 4096, nblocks=32)

Model-level tools are imported on first use (``import deftly`` stays light): ``deftly.project``,
``deftly.structurize`` / ``deftly.StructureConfig``, ``deftly.adapt``, ``deftly.save`` / ``deftly.load`` /
``deftly.densify``, ``deftly.save_pretrained`` / ``deftly.from_pretrained`` (Hugging Face models).
"""

import typing as _typing  # private: dir(deftly) lists only the public API and subpackages

from .core.base import StructuredLinear
from .core.registry import get, make, register, set_builtin_loader, structures

__all__ = [
    "StructureConfig",
    "StructuredLinear",
    "adapt",
    "densify",
    "from_pretrained",
    "get",
    "load",
    "make",
    "param_groups",
    "plan",
    "project",
    "register",
    "save",
    "save_pretrained",
    "structures",
    "structurize",
]
from ._version import __version__ as __version__  # re-exported

set_builtin_loader(lambda: __import__("deftly.layers"))  # the built-ins register on first registry use
del set_builtin_loader

# name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "project": ("deftly.surgery.project", "project"),
    "structurize": ("deftly.surgery.structurize", "structurize"),
    "plan": ("deftly.surgery.plan", "plan"),
    "StructureConfig": ("deftly.surgery.config", "StructureConfig"),
    "adapt": ("deftly.surgery.adapters", "adapt"),
    "save": ("deftly.io.persist", "save"),
    "save_pretrained": ("deftly.io.hf", "save_pretrained"),
    "from_pretrained": ("deftly.io.hf", "from_pretrained"),
    "load": ("deftly.io.persist", "load"),
    "densify": ("deftly.io.persist", "densify"),
    "param_groups": ("deftly.train.mup", "param_groups"),
}
# subpackages reachable as attributes (``deftly.transforms.dft``) without importing them up front; the
# right-hand side is the module (``deftly.dual`` keeps its former name; ``deftly.projection`` is now the per-layer
# numerics of ``deftly.core.projection``: the model-level ``project`` is ``deftly.project``)
_SUBMODULES = {
    "core": "deftly.core",
    "layers": "deftly.layers",
    "transforms": "deftly.transforms",
    "dual": "deftly.transforms.dual",
    "kernels": "deftly.kernels",
    "mixers": "deftly.mixers",
    "surgery": "deftly.surgery",
    "projection": "deftly.core.projection",
    "io": "deftly.io",
    "distributed": "deftly.distributed",
    "data": "deftly.data",
    "train": "deftly.train",
    "bench": "deftly.bench",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'deftly' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
