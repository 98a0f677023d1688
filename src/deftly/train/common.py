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
from .budget import fit_budget

__all__ = ["available", "budget_linear", "forward_flops", "linear_stats", "median_step_time", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def available(requested: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(registered, notes)``: the requested structures that are registered; a note for each missing one."""
    have = set(registry.structures())
    keep, notes = [], []
    for name in requested:
        if name in have:
            keep.append(name)
        else:
            notes.append(f"{name}: not registered in this deftly build, skipped "
                         f"(registered: {', '.join(sorted(have))})")
    return keep, notes


def budget_linear(structure: str, in_features: int, out_features: int, fraction: float,
                  bias: bool = True) -> StructuredLinear:
    """``dense`` as is, any other structure with the hyperparameters of :func:`fit_budget`."""
    if structure == "dense":
        return registry.make("dense", in_features, out_features, bias)
    hp, _ = fit_budget(structure, in_features, out_features, fraction)
    return registry.make(structure, in_features, out_features, bias, **hp)


def linear_stats(model: nn.Module, hidden: Iterable[nn.Module] = ()) -> dict[str, Any]:
    """Parameter and FLOP counts: all parameters, the weights of the ``hidden`` layers (bias excluded)
    and the dense weights they replace, and forward FLOPs per example of every linear-like layer."""
    hidden = list(hidden)
    total = sum(p.numel() for p in model.parameters())
    flops = 0
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            flops += m.flops(1)
        elif isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
    hidden_w = sum(m.num_params() - (m.out_features if m.bias is not None else 0) for m in hidden)
    dense_w = sum(m.in_features * m.out_features for m in hidden)
    hidden_flops = sum(m.flops(1) for m in hidden)
    hp = {}
    for m in hidden:
        hp = m.hparams()
        break
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
