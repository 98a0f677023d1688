"""Fast multiplies for deftly's structures, and the controls of the dispatch between them.

* :mod:`~deftly.kernels.blockdiag`, :mod:`~deftly.kernels.monarch` — pure-PyTorch kernels with
  copy-avoiding layouts, reused buffers (:mod:`~deftly.kernels._pool`) and hand-written backwards,
  registered as ``torch.library`` custom ops so ``torch.compile(fullgraph=True)`` keeps working; without
  gradients and at small batch, plain ``bmm``'s with the bias fused;
* :mod:`~deftly.kernels.butterfly` — every butterfly as two block-diagonal batched matmuls;
* :mod:`~deftly.kernels.linear` — dense and low-rank products with the bias fused (``addmm``);
* :mod:`~deftly.kernels.triton_kernels` — GPU kernels (Triton), imported only when asked for;
* :mod:`~deftly.kernels.dispatch` — forcing, opt-in tuning and what was decided.

Kernels are functions of tensors and sizes; each structure class declares its own
(``kernels = {"kernel": KernelSpec(fn=monarch_matmul, default=True)}`` in its layer module) and
``StructuredLinear.forward`` (:mod:`deftly.core.dispatch`) picks one per (batch bucket, dtype, device,
mode): deterministically by default, by timing inside :func:`tune`.

>>> import deftly, deftly.kernels
>>> deftly.kernels.set_backend("dense")           # force for every structure
>>> deftly.kernels.set_backend("auto")            # back to the automatic choice
>>> layer = deftly.make("monarch", 64, 64)
>>> layer.kernel_backend = "kernel"               # force for one layer
>>> with deftly.kernels.tune():                   # time the candidates of keys seen for the first time
...     _ = layer(__import__("torch").randn(8, 64))
"""

from . import _pool, blas
from ._common import triton_usable
from .blockdiag import blockdiag_matmul, blockdiag_matmul_strided, blockdiag_matmul_triton
from .butterfly import butterfly_flops, butterfly_matmul
from .dispatch import (
    KernelSpec,
    backends,
    choose,
    clear_cache,
    decisions,
    default_backend,
    dense_weight,
    get_backend,
    lookup,
    matmul,
    register_kernel,
    set_backend,
    timings,
    tune,
    use_backend,
)
from .linear import linear_matmul, lowrank_matmul
from .monarch import monarch_matmul, monarch_matmul_triton

__all__ = [
    "KernelSpec",
    "backends",
    "blas",
    "blockdiag_matmul",
    "blockdiag_matmul_strided",
    "blockdiag_matmul_triton",
    "butterfly_flops",
    "butterfly_matmul",
    "choose",
    "clear_cache",
    "clear_workspace",
    "decisions",
    "default_backend",
    "dense_weight",
    "get_backend",
    "linear_matmul",
    "lookup",
    "lowrank_matmul",
    "matmul",
    "monarch_matmul",
    "monarch_matmul_triton",
    "register_kernel",
    "set_backend",
    "timings",
    "triton_usable",
    "tune",
    "use_backend",
    "workspace_stats",
]


def clear_workspace() -> None:
    """Free the idle buffers the kernels keep for reuse."""
    _pool.clear()


def workspace_stats() -> dict:
    """Hits, misses and bytes held by the kernels' buffer pool."""
    return _pool.stats()
