"""Fast multiplies for deftly's structures and the automatic dispatch between them.

* :mod:`~deftly.kernels.blockdiag`, :mod:`~deftly.kernels.monarch` — pure-PyTorch kernels with
  copy-avoiding layouts, reused buffers (:mod:`~deftly.kernels._pool`) and hand-written backwards,
  registered as ``torch.library`` custom ops so ``torch.compile(fullgraph=True)`` keeps working;
* :mod:`~deftly.kernels.butterfly` — every butterfly as two block-diagonal batched matmuls;
* :mod:`~deftly.kernels.dispatch` — picks the fastest of the structure's own code, these kernels and
  the materialised dense weight per (structure, shape, batch bucket, dtype, train/infer), cached;
* :mod:`~deftly.kernels.triton_kernels` — GPU kernels (Triton), imported only when asked for.

>>> import deftly, deftly.kernels
>>> deftly.kernels.set_backend("dense")           # force for every structure
>>> deftly.kernels.set_backend("auto")            # back to the automatic choice
>>> layer = deftly.make("monarch", 64, 64)
>>> layer.kernel_backend = "kernel"               # force for one layer
"""

from . import _pool, _register  # noqa: F401  (_register: the built-in kernels register themselves)
from .dispatch import (
    backends,
    choose,
    clear_cache,
    decisions,
    dense_weight,
    get_backend,
    matmul,
    register_backend,
    set_backend,
    timings,
    use_backend,
)

__all__ = [
    "backends",
    "choose",
    "clear_cache",
    "clear_workspace",
    "decisions",
    "dense_weight",
    "get_backend",
    "matmul",
    "register_backend",
    "set_backend",
    "timings",
    "use_backend",
    "workspace_stats",
]


def clear_workspace() -> None:
    """Free the idle buffers the kernels keep for reuse."""
    _pool.clear()


def workspace_stats() -> dict:
    """Hits, misses and bytes held by the kernels' buffer pool."""
    return _pool.stats()
