"""Process groups under torchrun: setup/teardown, rank facts, batch slices, collectives."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

STRATEGIES = ("none", "ddp", "fsdp2")
#: device meshes built by wrap_model, per (device type, world size); teardown forgets them
_MESHES: dict[tuple[str, int], Any] = {}
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node, the
    ``backend`` of the default process group (``None`` for a single process) and the ``device`` to use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _dist():
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def info() -> DistInfo:
    """The current :class:`DistInfo` (single-process defaults when no process group is up)."""
    if not _initialized():
        return DistInfo()
    dist = _dist()
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def setup(backend: str | None = None, *, timeout_s: float = 600.0) -> DistInfo:
    """Start the default process group from torchrun's environment variables.

    ``backend``: ``"gloo"`` or ``"nccl"``; default ``nccl`` when a GPU is visible, else ``gloo``. With
    none of torchrun's variables set this starts nothing and returns a single-process :class:`DistInfo`,
    so the same script runs with plain ``python``. Calling it twice returns the running group's info.
    """
    if _initialized():
        return info()
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return DistInfo()
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"distributed setup: environment variable(s) {', '.join(missing)} missing while "
                         f"{', '.join(present)} are set; launch with `torchrun --nproc_per_node=N script.py` "
                         "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"distributed setup: RANK={rank} is outside [0, WORLD_SIZE={world})")
    use_cuda = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"distributed setup: backend={backend!r} is not supported; use 'gloo' (CPU) or "
                         "'nccl' (GPU)")
    if backend == "nccl" and not use_cuda:
        raise ValueError(f"distributed setup: backend='nccl' needs a GPU for LOCAL_RANK={local_rank}, but "
                         f"{torch.cuda.device_count()} are visible; use backend='gloo' on CPU")
    dist = _dist()
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return info()


def teardown() -> None:
    """Destroy the default process group (no-op when none is up)."""
    _MESHES.clear()
    if _initialized():
        _dist().destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return info().rank == 0


def barrier() -> None:
    if _initialized():
        _dist().barrier()


def local_slice(global_batch: int, dist_info: DistInfo | None = None) -> slice:
    """This rank's contiguous slice of a global batch of ``global_batch`` rows.

    The global batch must split evenly: DDP and FSDP2 average gradients over ranks, which equals the
    gradient of the mean loss over the global batch only when every rank has the same number of rows.
    """
    d = dist_info or info()
    if global_batch % d.world_size:
        raise ValueError(f"global_batch={global_batch} does not split evenly over world_size={d.world_size} "
                         f"ranks; use a multiple of {d.world_size}")
    n = global_batch // d.world_size
    return slice(d.rank * n, (d.rank + 1) * n)


def all_reduce_mean(value: float | Tensor) -> float:
    """Mean of a scalar over ranks (for logging a loss); the value itself in a single process."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
    if not _initialized():
        return float(t)
    d = info()
    t = t.to(d.device)
    _dist().all_reduce(t)
    return float(t) / d.world_size
