"""``wrap_model``: DDP or FSDP2 around a model with structured layers."""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear
from .fsdp2 import _CONVERTED, _convert_for_fsdp2
from .process import _MESHES, STRATEGIES, _initialized, info


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
    total = functools.reduce(operator.add, [torch.view_as_real(t).sum() if t.is_complex() else t.sum()
                                            for t in leaves])
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


def _mixed_dtypes(params: Sequence[tuple[str, Tensor]]) -> str | None:
    """``"[dtypes] (name: dtype, ...)"`` when ``params`` hold more than one dtype, else ``None``."""
    dtypes = sorted({str(p.dtype) for _, p in params})
    if len(dtypes) < 2:
        return None
    return f"{dtypes} ({', '.join(f'{n}: {p.dtype}' for n, p in params)})"


def _check_fsdp2_groups(model: nn.Module, groups: Sequence[tuple[str, nn.Module]]) -> None:
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
