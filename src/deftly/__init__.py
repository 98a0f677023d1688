"""deftly: structured matrices as drop-in ``nn.Linear`` layers.

Monarch, butterfly, Block Tensor-Train, low-rank, block-diagonal, banded, Kronecker and more, each with
``to_dense()``, exact parameter and FLOP counts, a structure-aware init and a slow reference multiply.

>>> import deftly
>>> layer = deftly.make("monarch", 1024, 4096, nblocks=32)

Model-level tools are imported on first use (``import deftly`` stays light): ``deftly.project``,
``deftly.structurize`` / ``deftly.StructureConfig``, ``deftly.adapt``, ``deftly.save`` / ``deftly.load`` /
``deftly.densify``.
"""

from .base import StructuredLinear
from .registry import get, make, register, structures

__all__ = [
    "StructureConfig",
    "StructuredLinear",
    "adapt",
    "densify",
    "get",
    "load",
    "make",
    "param_groups",
    "project",
    "register",
    "save",
    "structures",
    "structurize",
]
__version__ = "0.1.0"

# name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "project": ("deftly.projection", "project"),
    "structurize": ("deftly.surgery", "structurize"),
    "StructureConfig": ("deftly.surgery", "StructureConfig"),
    "adapt": ("deftly.adapters", "adapt"),
    "save": ("deftly.persist", "save"),
    "load": ("deftly.persist", "load"),
    "densify": ("deftly.persist", "densify"),
    "param_groups": ("deftly.train.mup", "param_groups"),
}
# subpackages reachable as attributes (``deftly.transforms.dft``) without importing them up front
_SUBMODULES = {"transforms", "dual", "kernels", "distributed", "data", "train", "projection", "surgery"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"deftly.{name}")
    raise AttributeError(f"module 'deftly' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
