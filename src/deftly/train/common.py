"""Helpers shared by the recipes: budgeted layers, counting, timing, seeding."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import registry
from ..core.base import StructuredLinear
from ..surgery.budget import choose_hparams

__all__ = ["available", "budget_linear", "check_counts", "check_structures", "forward_flops", "linear_stats",
           "median_step_time", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_structures(names: Iterable[str], what: str = "structures") -> tuple[str, ...]:
    """``names`` as a tuple, each a registered structure named once. Unknown names raise ``ValueError``
    listing the choices with the closest match (``'monarh'`` -> ``Did you mean 'monarch'?``); empty or
    repeated names are refused too (a recipe must never skip a structure silently)."""
    if isinstance(names, str):
        raise TypeError(f"{what} must be a sequence of structure names, e.g. ('dense', 'monarch'), got the "
                        f"string {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"{what} is empty; name at least one structure, e.g. dense,monarch")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what}: every entry must be a structure name (str), got {name!r}")
        if not name.strip():
            raise ValueError(f"{what} {list(names)} has an empty name; e.g. dense,monarch")
        registry.get(name)  # unknown: ValueError with the choices and the closest match
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names {', '.join(map(repr, dup))} more than once; name each structure once")
    return names


def check_counts(owner: str, optional: Iterable[str] = (), **values: Any) -> None:
    """Each of ``values`` is an int >= 1 (those in ``optional`` may also be ``None``); else ``ValueError``
    naming the value and its command-line flag."""
    optional = set(optional)
    for name, v in values.items():
        if v is None and name in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{owner}: {name}={v!r} is invalid; it must be a whole number >= 1 ({flag} N)"
                             + (" or left unset" if name in optional else ""))


def available(requested: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(names, notes)``: the requested structures, checked by :func:`check_structures` (an unknown name
    is an error naming the closest registered one, never a silent skip); ``notes`` is empty."""
    return list(check_structures(requested)), []


def budget_linear(structure: str, in_features: int, out_features: int, fraction: float,
                  bias: bool = True) -> StructuredLinear:
    """``dense`` as is, any other structure with the hyperparameters that :func:`deftly.structurize` would
    choose for ``budget=fraction`` (the one budget solver, :func:`deftly.surgery.budget.choose_hparams`:
    at most ``fraction`` of the dense weight, in the structure's preferred shape). Raises
    :class:`deftly.surgery.budget.BudgetError` when nothing fits."""
    if structure == "dense":
        return registry.make("dense", in_features, out_features, bias)
    hp = choose_hparams(structure, in_features, out_features, fraction, bias=bias)[0]
    return registry.make(structure, in_features, out_features, bias, **hp)


def linear_stats(model: nn.Module, hidden: Iterable[nn.Module] = ()) -> dict[str, Any]:
    """Parameter and FLOP counts: all parameters, the weights of the ``hidden`` layers (bias excluded)
    and the dense weights they replace, and forward FLOPs per example of every linear-like layer.
    ``hidden``: :class:`~deftly.core.base.StructuredLinear` layers (``dense`` included); anything else is a
    ``TypeError``."""
    structured: list[StructuredLinear] = []
    for m in hidden:
        if not isinstance(m, StructuredLinear):
            raise TypeError(f"linear_stats: hidden layers must be StructuredLinear (build them with "
                            f"budget_linear or deftly.make), got {type(m).__name__}")
        structured.append(m)
    total = sum(p.numel() for p in model.parameters())
    flops = 0
    for mod in model.modules():
        if isinstance(mod, StructuredLinear):
            flops += mod.flops(1)
        elif isinstance(mod, nn.Linear):
            flops += 2 * mod.in_features * mod.out_features
    hidden_w = sum(h.num_params() - (h.out_features if h.bias is not None else 0) for h in structured)
    dense_w = sum(h.in_features * h.out_features for h in structured)
    hidden_flops = sum(h.flops(1) for h in structured)
    hp = structured[0].hparams() if structured else {}
    return {"params": total, "hidden_params": hidden_w, "hidden_dense_params": dense_w,
            "hidden_fraction": hidden_w / dense_w if dense_w else float("nan"), "flops": flops,
            "hidden_flops": hidden_flops, "hparams": hp}


def forward_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs of the linear-like layers in one forward of ``model(*inputs)``: rows actually multiplied
    (tokens x batch) times each layer's exact per-row count (2 x multiply-adds, bias adds excluded)."""
    total = 0
    handles = []

    def hook(module, args, _out):
        nonlocal total
        rows = args[0].numel() // args[0].shape[-1]
        per_row = module.flops(1) if isinstance(module, StructuredLinear) else 2 * module.in_features * module.out_features
        total += rows * per_row

    inner = {id(c) for m in model.modules() if isinstance(m, StructuredLinear)
             for c in m.modules() if c is not m}  # parts of a composite structure are counted by it
    for m in model.modules():
        if isinstance(m, (StructuredLinear, nn.Linear)) and id(m) not in inner:
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def median_step_time(step: Callable[[], None], repeats: int = 15, warmup: int = 3, clock: str = "wall") -> float:
    """Median seconds of ``step()`` — robust to other processes sharing the CPU. ``clock="process"``
    counts this process's CPU time (``time.process_time``) instead of wall-clock time."""
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = now()
        step()
        times.append(now() - t0)
    return float(np.median(times))
