"""What the suite runs: sizes, batches, dtypes, structures and their benchmark hyperparameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..core.base import StructuredLinear

SIZES_FULL = [(1024, 1024), (4096, 4096), (1024, 4096)]
#: glibc without mmap for large blocks and without trimming: freed 32 MB buffers are reused from the heap
#: instead of being unmapped and page-faulted in again (glibc's mmap threshold cannot exceed 32 MiB)
GLIBC_NOMMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
BATCHES = [1, 64, 2048]
KERNEL_STRUCTURES = ("monarch", "blockdiag", "butterfly")


@dataclass
class BenchConfig:
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 4096)])
    batches: list[int] = field(default_factory=lambda: list(BATCHES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])
    structures: list[str] | None = None  # None: every registered structure
    fft: bool = True  # the exact-FFT butterfly as an extra row (square sizes)
    peers: bool = False
    backends: bool = False  # also time each forced backend of the kernel structures
    min_run_time: float = 0.3
    min_samples: int = 3
    memory: bool = True
    seed: int = 0


def quick_config() -> BenchConfig:
    """About two minutes on 2 cores: n = 4096, fp32, every structure, plus Monarch/blockdiag native."""
    return BenchConfig(backends=False)


def full_config() -> BenchConfig:
    return BenchConfig(sizes=list(SIZES_FULL), dtypes=["float32", "bfloat16"], peers=True, backends=True,
                       min_run_time=1.0)


# ------------------------------------------------------------------------------------------ layers
def bench_hparams(name: str, in_f: int, out_f: int) -> dict[str, Any]:
    """Hyperparameters used by the suite: Monarch and block-diagonal with ``sqrt(min(in, out))`` blocks
    (64 at n = 4096, 32 at n = 1024); every other structure with its constructor defaults."""
    k = math.isqrt(min(in_f, out_f))
    if name == "monarch":
        return {"nblocks": math.isqrt(in_f)}
    if name == "blockdiag":
        return {"nblocks": k}
    return {}


def build(name: str, in_f: int, out_f: int, dtype: torch.dtype, **extra: Any) -> StructuredLinear:
    from ..core.registry import get, make

    hp = {**bench_hparams(name, in_f, out_f), **extra}
    try:
        return make(name, in_f, out_f, dtype=dtype, **hp)
    except (ValueError, TypeError):
        ex = get(name).examples(in_f, out_f)[0]
        return make(name, in_f, out_f, dtype=dtype, **{**ex, **extra})
