"""A small pool of large CPU buffers, reused once nothing else holds them.

Why: with glibc's allocator every fresh buffer of >= 32 MB is a new ``mmap`` whose first touch costs a
page fault per 4 KiB (~9 ms per 32 MB on the 2-core benchmark machine, more under load), which is as
long as the batched matmul that fills it. The kernels ask the pool for their outputs, saved activations
and temporaries; a buffer is handed out again only when its storage is referenced by the pool alone
(``torch._C._storage_Use_Count``), i.e. after the caller, autograd's saved tensors and every view of it
are gone. So reuse is invisible to the caller: a returned tensor stays valid as long as it is alive.

Only buffers of at least :data:`MIN_BYTES` are pooled (smaller ones come from malloc's free lists
anyway); the pool holds at most :func:`set_limit` bytes of *idle* buffers (default 1 GiB) and drops the
least recently used idle ones beyond that. ``clear()`` frees every idle buffer.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "clear", "empty", "set_limit", "stats"]

MIN_BYTES = 1 << 20
_LIMIT = [1 << 30]
_LOCK = threading.Lock()
# key (dtype, device) -> OrderedDict[id, 1-D tensor], most recently used last
_BUFS: dict[tuple, OrderedDict] = {}
_STATS = {"hits": 0, "misses": 0}


def _free(t: Tensor) -> bool:
    # 1 reference from the pool's tensor + 1 from the temporary Python storage object below
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str = "cpu"
          ) -> Tensor:
    """An uninitialised contiguous tensor, from the pool when it is large and on the CPU."""
    numel = math.prod(shape)
    device = torch.device(device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (dtype, device)
    with _LOCK:
        bufs = _BUFS.setdefault(key, OrderedDict())
        best = None
        for k, t in bufs.items():  # smallest idle buffer that fits and wastes at most half
            if numel <= t.numel() <= 2 * numel and (best is None or t.numel() < best[1].numel()) and _free(t):
                best = (k, t)
        if best is not None:
            bufs.move_to_end(best[0])
            _STATS["hits"] += 1
            return best[1][:numel].view(shape)
        _STATS["misses"] += 1
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode later
            t = torch.empty(numel, dtype=dtype, device=device)
        bufs[id(t)] = t
        _trim()
        return t.view(shape)


def _trim() -> None:
    idle = [(key, k, t) for key, bufs in _BUFS.items() for k, t in bufs.items() if _free(t)]
    total = sum(t.numel() * t.element_size() for _, _, t in idle)
    for key, k, t in idle:  # oldest first within each key
        if total <= _LIMIT[0]:
            break
        del _BUFS[key][k]
        total -= t.numel() * t.element_size()


def clear() -> None:
    """Drop every idle buffer (buffers still in use are kept until they are released)."""
    with _LOCK:
        for _key, bufs in list(_BUFS.items()):
            for k in [k for k, t in bufs.items() if _free(t)]:
                del bufs[k]


def set_limit(nbytes: int) -> None:
    """At most ``nbytes`` of idle buffers are kept (0 disables reuse)."""
    with _LOCK:
        _LIMIT[0] = int(nbytes)
        _trim()


def stats() -> dict:
    with _LOCK:
        held = sum(t.numel() * t.element_size() for bufs in _BUFS.values() for t in bufs.values())
        return {**_STATS, "held_bytes": held, "buffers": sum(len(b) for b in _BUFS.values())}
