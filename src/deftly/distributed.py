"""Data-parallel training of structured models under ``torchrun``: DDP and FSDP2, CPU (gloo) or GPU (NCCL).

One small API, the same code path on every backend::

    info = deftly.distributed.setup()                 # reads torchrun's env vars; gloo on CPU, nccl on GPU
    model = deftly.distributed.wrap_model(model, "fsdp2")   # or "ddp", or "none"
    ...  # train: each rank feeds its slice of the global batch (local_slice)
    state = deftly.distributed.full_state_dict(model)  # collective; full CPU tensors on rank 0, {} elsewhere
    deftly.distributed.teardown()

Launch: ``torchrun --standalone --nproc_per_node=2 train.py`` (see ``docs/distributed.md``). Without
torchrun's variables :func:`setup` returns a one-process :class:`DistInfo` and ``wrap_model(m, "none")``
is the identity, so a script runs unchanged on one process.

What structured layers need, and what :func:`wrap_model` does about it
----------------------------------------------------------------------
FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied to every :class:`~deftly.StructuredLinear`
(one all-gather group per layer), then to the root. It

* shards every parameter on dim 0. Structured factors often have a tiny dim 0 (a butterfly's
  ``(depth, log n, n/2, 2, 2)`` twiddles, a rank-1 Kronecker ``(1, m, n)`` factor): sharding them on dim 0
  leaves every rank but rank 0 empty. ``wrap_model`` shards such a parameter on its first other dimension
  that ``world_size`` divides (FSDP2 shards dims other than 0 only evenly), else on dim 0;
* replaces each parameter by a new ``DTensor`` parameter, dropping attributes set on the ``Parameter``
  object: ``wrap_model`` copies them over;
* requires one dtype per group and rejects 0-d parameters; and with torch 2.13, a *complex* parameter
  whose dim 0 does not divide evenly across ranks silently diverges under Adam/AdamW (measured: 4e-2
  after 3 steps; SGD and even shards are fine). ``wrap_model`` therefore stores each complex parameter
  as two real parameters (real and imaginary part, a ``torch.nn.utils.parametrize`` parametrization, so
  the layer code still sees one complex tensor) and each 0-d parameter as a 1-element one. Adam on
  (real, imag) is exactly torch's Adam on a complex tensor (which works on ``view_as_real``). The state-dict
  helpers below translate the keys back, so checkpoints are the same as a single process's. Remaining
  mixed dtypes inside one layer raise a ``ValueError`` naming the layer.
* keeps parameters sharded outside ``forward``: use :func:`gathered` around ``layer.to_dense()``;
  ``reference_forward`` is registered as a forward method so it all-gathers like ``forward``.

DDP requires every parameter to receive a gradient each step unless ``find_unused_parameters=True``:
``wrap_model(..., example_input=x)`` probes one forward/backward in the current process and turns it on
only if some parameter is unused. Non-contiguous parameters (which make DDP's gradient buckets disagree
with the gradient strides) are made contiguous in place before wrapping, for both strategies.

Checkpoints: :func:`full_state_dict` / :func:`full_optimizer_state_dict` return, on rank 0, exactly what a
single process would have (same keys, shapes and dtypes; the optimizer state keyed by parameter name), so
``deftly.checkpoint.save_checkpoint`` files move freely between one process and N;
:func:`load_full_state_dict` / :func:`load_full_optimizer_state_dict` check the file against the model on
rank 0 (key, shape, dtype), raise the same ``ValueError`` on every rank before anything is changed, then
broadcast and shard.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import StructuredLinear

__all__ = ["DistInfo", "STRATEGIES", "setup", "teardown", "info", "is_main", "barrier", "local_slice",
           "all_reduce_mean", "wrap_model", "unwrap", "unused_parameters", "gathered", "full_state_dict",
           "load_full_state_dict", "full_optimizer_state_dict", "load_full_optimizer_state_dict",
           "check_state_dict"]

STRATEGIES = ("none", "ddp", "fsdp2")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node, the
    ``backend`` of the default process group (``None`` for a single process) and the ``device`` to use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

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


# --------------------------------------------------------------------------- parametrizations for FSDP2
class _ComplexAsRealImag(nn.Module):
    """A complex parameter stored as two real ones: ``original0`` (real part), ``original1`` (imag)."""

    def forward(self, real: Tensor, imag: Tensor) -> Tensor:
        return torch.complex(real, imag)

    def right_inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.real.contiguous().clone(), z.imag.contiguous().clone()


class _ScalarAsVector(nn.Module):
    """A 0-d parameter stored as a 1-element vector (FSDP2 refuses 0-d parameters)."""

    def forward(self, v: Tensor) -> Tensor:
        return v.reshape(())

    def right_inverse(self, s: Tensor) -> Tensor:
        return s.reshape(1).clone()


_CONVERTED = "_deftly_fsdp2_converted"  # root attribute: {user fqn: (kind, [stored fqns])}
_MESHES: dict[tuple[str, int], Any] = {}


def _fqn(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert_for_fsdp2(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    from torch.nn.utils import parametrize

    converted: dict[str, tuple[str, list[str]]] = {}
    for mod_name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            continue  # user parametrizations: left alone
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_complex():
                kind, par = "complex", _ComplexAsRealImag()
            elif p.dim() == 0:
                kind, par = "scalar", _ScalarAsVector()
            else:
                continue
            attrs = dict(p.__dict__)
            parametrize.register_parametrization(module, name, par, unsafe=True)
            stored = module.parametrizations[name]
            base = _fqn(mod_name, f"parametrizations.{name}")
            if kind == "complex":
                originals = [_fqn(base, "original0"), _fqn(base, "original1")]
                params = [stored.original0, stored.original1]
            else:
                originals = [_fqn(base, "original")]
                params = [stored.original]
            for q in params:
                q.requires_grad_(p.requires_grad)
                for k, v in attrs.items():
                    setattr(q, k, v)
            converted[_fqn(mod_name, name)] = (kind, originals)
    return converted


def _to_stored(converted: dict[str, tuple[str, list[str]]], sd: dict[str, Any]) -> dict[str, Any]:
    """User-facing (single-process) keys -> the keys of a converted FSDP2 model."""
    out = dict(sd)
    for key, (kind, originals) in converted.items():
        if key not in out:
            continue
        t = out.pop(key)
        if kind == "complex":
            out[originals[0]], out[originals[1]] = t.real.contiguous(), t.imag.contiguous()
        else:
            out[originals[0]] = t.reshape(1)
    return out


def _from_stored(converted: dict[str, tuple[str, list[str]]], sd: dict[str, Any]) -> dict[str, Any]:
    out = dict(sd)
    for key, (kind, originals) in converted.items():
        if not all(o in out for o in originals):
            continue
        parts = [out.pop(o) for o in originals]
        if kind == "complex":
            out[key] = torch.complex(parts[0], parts[1]) if isinstance(parts[0], Tensor) else parts[0]
        else:
            out[key] = parts[0].reshape(()) if isinstance(parts[0], Tensor) else parts[0]
    return out


# --------------------------------------------------------------------------- wrapping
def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 wraps in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _collective(model: nn.Module) -> bool:
    """State-dict helpers communicate only for a DDP/FSDP2-wrapped model; a plain module (one process, or
    the same full model on every rank) is handled locally, even while a process group is up."""
    from torch.nn.parallel import DistributedDataParallel

    return _initialized() and (isinstance(model, DistributedDataParallel) or _is_fsdp2(model))


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def unused_parameters(model: nn.Module, example_input: Any) -> list[str]:
    """Names of trainable parameters that get no gradient from ``model(example_input)`` (one
    forward/backward in this process; ``.grad`` fields are left untouched; a model that draws random
    numbers in ``forward``, e.g. dropout, consumes them, identically on every rank)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    out = model(*inputs)
    leaves = [t for t in (out if isinstance(out, (tuple, list)) else [out])
              if isinstance(t, Tensor) and t.requires_grad]
    if not leaves:
        return [n for n, _ in named]
    total = sum(torch.view_as_real(t).sum() if t.is_complex() else t.sum() for t in leaves)
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def _make_contiguous(model: nn.Module) -> list[str]:
    fixed = []
    for name, p in model.named_parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
            fixed.append(name)
    return fixed


def _placement_fn(world: int):
    from torch.distributed.tensor import Shard

    def place(p: nn.Parameter):
        if p.dim() == 0 or p.shape[0] >= world:
            return Shard(0)
        for d in range(1, p.dim()):  # FSDP2 shards a dim other than 0 only evenly
            if p.shape[d] % world == 0:
                return Shard(d)
        return Shard(0)

    return place


def _mixed_dtypes(params: list[tuple[str, Tensor]]) -> str | None:
    """``"[dtypes] (name: dtype, ...)"`` when ``params`` hold more than one dtype, else ``None``."""
    dtypes = sorted({str(p.dtype) for _, p in params})
    if len(dtypes) < 2:
        return None
    return f"{dtypes} ({', '.join(f'{n}: {p.dtype}' for n, p in params)})"


def _check_fsdp2_groups(model: nn.Module, groups: list[tuple[str, nn.Module]]) -> None:
    """One dtype per FSDP2 group (each structured layer, then the root's remaining parameters)."""
    claimed: set[int] = set()
    for name, layer in groups:
        params = list(layer.named_parameters())
        claimed.update(id(p) for _, p in params)
        mixed = _mixed_dtypes(params)
        if mixed:
            raise ValueError(f"wrap_model(strategy='fsdp2'): layer {name or '<root>'} "
                             f"({type(layer).__name__}) mixes parameter dtypes {mixed}; FSDP2 "
                             "all-gathers one dtype per layer: cast the layer to one dtype (layer.to(dtype))")
    mixed = _mixed_dtypes([(n, p) for n, p in model.named_parameters() if id(p) not in claimed])
    if mixed:
        raise ValueError(f"wrap_model(strategy='fsdp2'): the parameters outside structured layers mix dtypes "
                         f"{mixed}; FSDP2 needs one dtype per group: cast the model to one "
                         "dtype, or fully_shard those submodules yourself before calling wrap_model")


def wrap_model(model: nn.Module, strategy: str = "none", *, device: torch.device | str | None = None,
               find_unused_parameters: bool | None = None, example_input: Any = None,
               reshard_after_forward: bool = True, mp_policy: Any = None, **ddp_kwargs: Any) -> nn.Module:
    """Prepare ``model`` for data-parallel training; call it on every rank, before building the optimizer.

    ``strategy``: ``"none"`` (move to ``device`` only), ``"ddp"`` (returns a
    ``DistributedDataParallel`` wrapper) or ``"fsdp2"`` (``fully_shard`` on every structured layer,
    then the root; the model is modified in place and returned). ``find_unused_parameters`` (DDP): when
    ``None`` and ``example_input`` is given, turned on only if :func:`unused_parameters` finds any.
    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy``. Extra keyword arguments go to DDP.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"wrap_model: strategy={strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model: model must be an nn.Module, got {type(model).__name__}")
    d = info()
    dev = torch.device(device) if device is not None else d.device
    model = model.to(dev)
    if strategy == "none":
        return model
    if not d.distributed:
        raise RuntimeError(f"wrap_model(strategy={strategy!r}) needs a process group: call "
                           "deftly.distributed.setup() in a script launched by torchrun")
    _make_contiguous(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if find_unused_parameters is None:
            find_unused_parameters = bool(example_input is not None and
                                          unused_parameters(model, example_input))
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" \
            else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                       **ddp_kwargs)
    # fsdp2
    if ddp_kwargs:
        raise TypeError(f"wrap_model(strategy='fsdp2'): unexpected argument(s) {', '.join(ddp_kwargs)}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if _is_fsdp2(model):
        raise ValueError("wrap_model(strategy='fsdp2'): the model is already sharded")
    converted = _convert_for_fsdp2(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, StructuredLinear)]
    # only the outermost structured layers form groups (a structure may nest others, e.g. lrbd)
    outer = [(n, m) for n, m in layers if not any(n != o and n.startswith(o + ".") for o, _ in layers)]
    _check_fsdp2_groups(model, outer)
    attrs = {n: dict(p.__dict__) for n, p in model.named_parameters() if p.__dict__}
    mesh = _MESHES.get((dev.type, d.world_size))
    if mesh is None:
        mesh = _MESHES[(dev.type, d.world_size)] = init_device_mesh(dev.type, (d.world_size,))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
                          "shard_placement_fn": _placement_fn(d.world_size)}
    if mp_policy is not None:
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise TypeError(f"wrap_model: mp_policy must be a MixedPrecisionPolicy, got {type(mp_policy).__name__}")
        kw["mp_policy"] = mp_policy
    for _, layer in outer:
        fully_shard(layer, **kw)
        register_fsdp_forward_method(layer, "reference_forward")
    if not any(m is model for _, m in outer):
        fully_shard(model, **kw)
    for n, p in model.named_parameters():  # FSDP2 made new Parameter objects: keep user attributes
        for k, v in attrs.get(n, {}).items():
            setattr(p, k, v)
    object.__setattr__(model, _CONVERTED, converted)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """All-gather an FSDP2 model's parameters for use outside ``forward`` (``to_dense()``, inspection);
    collective, no-op for other strategies. Changes made inside are not written back."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    try:
        yield unwrap(model)
    finally:
        for m in reversed(mods):
            m.reshard()


# --------------------------------------------------------------------------- state dicts
def _converted(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    return getattr(unwrap(model), _CONVERTED, {})


def _expected_entries(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a single-process state dict of ``model`` (global shapes)."""
    inner = unwrap(model)
    meta = {k: (tuple(v.shape), v.dtype) for k, v in inner.state_dict().items() if isinstance(v, Tensor)}
    for key, (kind, originals) in _converted(model).items():
        if originals[0] not in meta:
            continue
        shape, dtype = meta.pop(originals[0])
        for o in originals[1:]:
            meta.pop(o, None)
        meta[key] = (shape, dtype.to_complex()) if kind == "complex" else ((), dtype)
    return meta


def check_state_dict(model: nn.Module, state_dict: dict[str, Any], *, source: str = "<state_dict>",
                     strict: bool = True) -> None:
    """Raise ``ValueError`` naming ``source``, the key and expected vs found if ``state_dict`` does not
    fit ``model`` (missing/extra keys when ``strict``, wrong shape or dtype, non-tensor values)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{source}: state dict must be a dict, got {type(state_dict).__name__}")
    want = _expected_entries(model)
    problems = []
    if strict:
        missing = sorted(set(want) - set(state_dict))
        extra = sorted(set(state_dict) - set(want))
        problems += [f"missing key {k!r} (expected shape {list(want[k][0])}, dtype {want[k][1]})"
                     for k in missing]
        problems += [f"unexpected key {k!r} (the model has no such entry)" for k in extra]
    for k, (shape, dtype) in want.items():
        if k not in state_dict:
            continue
        v = state_dict[k]
        if not isinstance(v, Tensor):
            problems.append(f"key {k!r}: expected a tensor of shape {list(shape)}, found {type(v).__name__}")
        elif tuple(v.shape) != shape:
            problems.append(f"key {k!r}: expected shape {list(shape)}, found {list(v.shape)}")
        elif v.dtype != dtype:
            problems.append(f"key {k!r}: expected dtype {dtype}, found {v.dtype}")
    if problems:
        raise ValueError(f"{source}: state dict does not match the model: " + "; ".join(problems))


def _raise_together(err: BaseException | None) -> None:
    """Rank 0's verdict (an exception or None) raised on every rank, so no rank waits in a collective."""
    if not _initialized():
        if err is not None:
            raise err
        return
    dist = _dist()
    box = [None if err is None else (type(err).__name__, str(err))] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        name, msg = box[0]
        if dist.get_rank() == 0 and err is not None:
            raise err
        raise (TypeError if name == "TypeError" else ValueError)(msg)


def full_state_dict(model: nn.Module, *, copy: bool = True) -> dict[str, Tensor]:
    """The model's state dict as a single process would have it, as full CPU tensors, on rank 0
    (``{}`` on other ranks). Collective for a DDP/FSDP2 model: call it on every rank. A plain module is
    read locally (full on every rank that asks); ``copy=False`` then returns its CPU tensors themselves
    (for a writer that copies anyway, such as ``save_checkpoint``)."""
    if not _collective(model):
        return {k: v.detach().to("cpu", copy=copy) for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _dist().get_rank() != 0:
        return {}
    return _from_stored(_converted(model), dict(sd))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None, *, strict: bool = True,
                         source: str = "<state_dict>") -> None:
    """Load a single-process state dict into ``model`` (any strategy). Collective for a DDP/FSDP2 model:
    rank 0 passes the dict, other ranks may pass ``None``; a plain module loads locally. Checked first (see :func:`check_state_dict`): on a mismatch
    every rank raises the same ``ValueError`` and the model is unchanged."""
    if not _collective(model):
        check_state_dict(model, state_dict if state_dict is not None else {}, source=source, strict=strict)
        unwrap(model).load_state_dict(state_dict, strict=strict)
        return
    rank0 = _dist().get_rank() == 0
    err = None
    if rank0:
        try:
            check_state_dict(model, state_dict if state_dict is not None else {}, source=source, strict=strict)
        except (ValueError, TypeError) as e:
            err = e
    _raise_together(err)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd = _to_stored(_converted(model), dict(state_dict)) if rank0 else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                              strict=strict))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("optimizer holds a parameter that is not in the model; build the optimizer "
                                 "from model.parameters() after wrap_model")
            out.append(names[id(p)])
    return out


def _optim_from_stored(converted, osd: dict) -> dict:
    """Optimizer state keyed by stored (converted) names -> keyed by the user's parameter names."""
    if not converted:
        return osd
    state = dict(osd["state"])
    for key, (kind, originals) in converted.items():
        if not all(o in state for o in originals):
            continue
        parts = [state.pop(o) for o in originals]
        merged = {}
        for k, v in parts[0].items():
            if isinstance(v, Tensor) and kind == "complex" and v.dim() > 0:
                merged[k] = torch.complex(v, parts[1][k])
            elif isinstance(v, Tensor) and kind == "scalar" and v.numel() == 1 and v.dim() == 1:
                merged[k] = v.reshape(())
            else:
                merged[k] = v
        state[key] = merged
    groups = []
    for g in osd["param_groups"]:
        names, seen = [], set()
        for n in g["params"]:
            user = next((k for k, (_, o) in converted.items() if n in o), n)
            if user not in seen:
                seen.add(user)
                names.append(user)
        groups.append({**g, "params": names})
    return {"state": state, "param_groups": groups}


def _optim_to_stored(converted, osd: dict) -> dict:
    if not converted:
        return osd
    state = dict(osd["state"])
    for key, (kind, originals) in converted.items():
        if key not in state:
            continue
        entry = state.pop(key)
        for i, o in enumerate(originals):
            part = {}
            for k, v in entry.items():
                if isinstance(v, Tensor) and kind == "complex" and v.is_complex():
                    part[k] = (v.real if i == 0 else v.imag).contiguous()
                elif isinstance(v, Tensor) and kind == "scalar" and v.dim() == 0 and k != "step":
                    part[k] = v.reshape(1)
                else:
                    part[k] = v.clone() if isinstance(v, Tensor) else v
            state[o] = part
    groups = []
    for g in osd["param_groups"]:
        names = []
        for n in g["params"]:
            names += converted[n][1] if n in converted else [n]
        groups.append({**g, "params": names})
    return {"state": state, "param_groups": groups}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, *, copy: bool = True
                              ) -> dict[str, Any]:
    """The optimizer state as full CPU tensors keyed by parameter name (``{"state": {name: {...}},
    "param_groups": [{..., "params": [names]}]}``), the same in one process and under DDP/FSDP2; on
    rank 0, ``{}`` on other ranks. Collective. ``copy=False``: as :func:`full_state_dict`."""
    if not _collective(model):
        names = _param_names(model, optimizer)
        osd = optimizer.state_dict()
        state = {names[i]: {k: (v.detach().to("cpu", copy=copy) if isinstance(v, Tensor) else v)
                            for k, v in s.items()} for i, s in osd["state"].items()}
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
        return {"state": state, "param_groups": groups}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _dist().get_rank() != 0:
        return {}
    return _optim_from_stored(_converted(model), osd)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any] | None, *, source: str = "<optimizer state>") -> None:
    """Load a name-keyed optimizer state (from :func:`full_optimizer_state_dict`, any strategy, any
    number of ranks) into ``optimizer``. Collective; rank 0 passes ``state``, others may pass ``None``."""
    local = not _collective(model)
    rank0 = local or _dist().get_rank() == 0
    err = None
    if rank0:
        try:
            _check_optim_state(model, optimizer, state, source)
        except (ValueError, TypeError) as e:
            err = e
    if local:
        if err is not None:
            raise err
    else:
        _raise_together(err)
    if local:
        names = _param_names(model, optimizer)
        index = {n: i for i, n in enumerate(names)}
        groups, start = [], 0
        for saved, current in zip(state["param_groups"], optimizer.param_groups):
            # Optimizer.load_state_dict pairs saved ids with the current parameters by position
            ids = list(range(start, start + len(current["params"])))
            start += len(ids)
            groups.append({**saved, "params": ids})
        osd = {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    osd = _optim_to_stored(_converted(model), state) if rank0 else {}
    # strict=False: parameters that never had a gradient (unused, frozen) have no state, exactly as in a
    # single process; names and shapes were checked above on rank 0, so no rank fails alone in here
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                      strict=False))


def _current_group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The user-facing parameter names of each of the optimizer's groups."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    back = {o: k for k, (_, originals) in _converted(model).items() for o in originals}
    out = []
    for g in optimizer.param_groups:
        group: list[str] = []
        for p in g["params"]:
            n = names.get(id(p), "<not in model>")
            n = back.get(n, n)
            if n not in group:
                group.append(n)
        out.append(group)
    return out


def _check_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Any, source: str) -> None:
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise ValueError(f"{source}: optimizer state must be a dict with 'state' and 'param_groups' keyed by "
                         "parameter name (from full_optimizer_state_dict)")
    want = _expected_entries(model)
    user_names = set(want)
    got_groups = [list(g.get("params", [])) for g in state["param_groups"]]
    if len(got_groups) != len(optimizer.param_groups):
        raise ValueError(f"{source}: optimizer has {len(optimizer.param_groups)} param group(s), the state has "
                         f"{len(got_groups)}")
    current = _current_group_names(model, optimizer)
    for i, (names, have) in enumerate(zip(got_groups, current)):
        bad = [n for n in names if n not in user_names]
        if bad:
            raise ValueError(f"{source}: param_groups[{i}] names parameter(s) {bad} that the model lacks")
        if set(names) != set(have):
            raise ValueError(f"{source}: param_groups[{i}]: expected parameters {sorted(have)}, found "
                             f"{sorted(names)}")
    for name, entry in state["state"].items():
        if name not in user_names:
            raise ValueError(f"{source}: optimizer state for unknown parameter {name!r}")
        shape, _ = want[name]
        for k, v in entry.items():
            if isinstance(v, Tensor) and v.dim() > 0 and tuple(v.shape) != shape:
                raise ValueError(f"{source}: optimizer state {name!r}/{k!r}: expected shape {list(shape)}, "
                                 f"found {list(v.shape)}")
