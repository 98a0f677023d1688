"""Full (rank-0) model and optimizer state dicts, checked before loading, the same file in 1 or N processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fsdp2 import _CONVERTED, _from_stored, _to_stored
from .process import _dist, _initialized
from .wrap import _collective, unwrap


def converted_params(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    return getattr(unwrap(model), _CONVERTED, {})


def _expected_entries(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a single-process state dict of ``model`` (global shapes)."""
    inner = unwrap(model)
    meta = {k: (tuple(v.shape), v.dtype) for k, v in inner.state_dict().items() if isinstance(v, Tensor)}
    for key, (kind, originals) in converted_params(model).items():
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
    return _from_stored(converted_params(model), dict(sd))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor] | None, *, strict: bool = True,
                         source: str = "<state_dict>") -> None:
    """Load a single-process state dict into ``model`` (any strategy). Collective for a DDP/FSDP2 model:
    rank 0 passes the dict, other ranks may pass ``None``; a plain module loads locally. Checked first (see :func:`check_state_dict`): on a mismatch
    every rank raises the same ``ValueError`` and the model is unchanged."""
    if not _collective(model):
        local = state_dict if state_dict is not None else {}
        check_state_dict(model, local, source=source, strict=strict)
        unwrap(model).load_state_dict(local, strict=strict)
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

    full = dict(state_dict) if state_dict is not None else {}
    sd = _to_stored(converted_params(model), full) if rank0 else {}
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
        names: list[str] = []
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
    return _optim_from_stored(converted_params(model), osd)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: dict[str, Any] | None, *, source: str = "<optimizer state>") -> None:
    """Load a name-keyed optimizer state (from :func:`full_optimizer_state_dict`, any strategy, any
    number of ranks) into ``optimizer``. Collective; rank 0 passes ``state``, others may pass ``None``."""
    local = not _collective(model)
    rank0 = local or _dist().get_rank() == 0
    err = None
    if rank0:
        try:
            check_optimizer_state(model, optimizer, state, source)
        except (ValueError, TypeError) as e:
            err = e
    if local:
        if err is not None:
            raise err
    else:
        _raise_together(err)
    saved: dict[str, Any] = state if state is not None else {}  # rank 0: checked above; others: not read
    if local:
        names = _param_names(model, optimizer)
        index = {n: i for i, n in enumerate(names)}
        groups, start = [], 0
        for group, current in zip(saved["param_groups"], optimizer.param_groups):
            # Optimizer.load_state_dict pairs saved ids with the current parameters by position
            ids = list(range(start, start + len(current["params"])))
            start += len(ids)
            groups.append({**group, "params": ids})
        osd: dict[str, Any] = {"state": {index[n]: s for n, s in saved["state"].items()},
                               "param_groups": groups}
        optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    osd = _optim_to_stored(converted_params(model), saved) if rank0 else {}
    # strict=False: parameters that never had a gradient (unused, frozen) have no state, exactly as in a
    # single process; names and shapes were checked above on rank 0, so no rank fails alone in here
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                      strict=False))


def _current_group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The user-facing parameter names of each of the optimizer's groups."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    back = {o: k for k, (_, originals) in converted_params(model).items() for o in originals}
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


def check_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Any, source: str) -> None:
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
