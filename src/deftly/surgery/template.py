"""The one surgery template: match -> build -> swap, with one hook per method.

:func:`match_layers` resolves a :class:`~deftly.surgery.config.StructureConfig` to one :class:`Plan` per
targeted layer; :func:`replace_layers` calls a method's ``build(i, plan) -> (module, LayerReport)`` hook for
every plan and swaps the built modules in only once all of them are built (an error in any hook leaves the
model unchanged), as PEFT's ``BaseTuner._create_and_replace``. :func:`deftly.structurize` and
:func:`deftly.adapt` are hooks on it; :func:`deftly.surgery.sequential.structurize_sequential`, which must
swap stage by stage, uses the same pieces (:func:`build_layer`, :func:`layer_report`, :func:`swap_in`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.base import StructuredLinear
from ..core.registry import make
from .budget import dense_count
from .config import _CONFIG_KEYS, StructureConfig, _match, _override_matches
from .marks import guard_save_pretrained, record_origin
from .modules import dense_weight, is_conv1d, linear_modules, linear_shape, output_head, set_module
from .report import LayerReport

__all__ = ["Plan", "build_layer", "layer_report", "match_layers", "replace_layers", "swap_in"]


@dataclass
class Plan:
    """One targeted layer: its name, module and the structure, budget and fixed hyperparameters that
    apply to it after overrides."""

    name: str
    module: nn.Module
    structure: str
    budget: float | None
    fixed: dict[str, Any]




def match_layers(model: nn.Module, config: StructureConfig) -> list[Plan]:
    """Resolve targets, excludes and overrides to one plan per layer (no change to the model)."""
    if not isinstance(config, StructureConfig):
        raise TypeError(f"config must be a deftly.StructureConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mods = linear_modules(model)
    names = [n for n, _ in mods]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer that can be structured "
                         f"(already-structured layers and adapters are skipped)")
    if config.target_modules == "all-linear":
        head = output_head(model, names)
        targets = [n for n in names if n != head]
        if not targets:
            raise ValueError(f"target_modules='all-linear' leaves no layer of {type(model).__name__} after "
                             f"excluding its output head {head!r}; name the layers instead")
    else:
        targets = _match(config.target_modules, names, "target_modules")
    if config.exclude_modules is not None:
        excluded = set(_match(config.exclude_modules, names, "exclude_modules"))
        targets = [n for n in targets if n not in excluded]
        if not targets:
            raise ValueError("exclude_modules removes every targeted layer; nothing would be structured")
    by_name = dict(mods)
    plans = []
    for pat in config.overrides:
        if not any(_override_matches(pat, n) for n in targets):
            raise ValueError(f"overrides pattern {pat!r} matches no targeted layer (patterns are names, "
                             f"suffixes or regexes matched in full). targeted: {', '.join(targets[:40])}"
                             + (" ..." if len(targets) > 40 else ""))
    for n in targets:
        structure, budget, fixed = config.structure, config.budget, dict(config.hparams)
        for pat, ov in config.overrides.items():
            if _override_matches(pat, n):
                if "structure" in ov and ov["structure"] != structure:
                    structure, fixed = ov["structure"], {}
                if "budget" in ov:
                    budget = ov["budget"]
                fixed.update({k: v for k, v in ov.items() if k not in _CONFIG_KEYS})
        plans.append(Plan(n, by_name[n], structure, budget, fixed))
    return plans


def build_layer(p: Plan, hp: dict[str, Any], seed: int, *, bias: bool | None = None, structure: str | None = None,
                dtype: torch.dtype | None = None) -> StructuredLinear:
    """``make(structure or p.structure, in, out, **hp)`` on the layer's device (and dtype unless given), its
    init drawn from ``torch.manual_seed(seed)`` without touching the global RNG; ``bias`` defaults to the
    layer's own. A bad hyperparameter is re-raised naming the layer; a complex-valued structure in place
    of a real layer is refused (the model's activations would turn complex)."""
    in_f, out_f = linear_shape(p.module)
    w = dense_weight(p.module)
    structure = structure or p.structure
    if bias is None:
        bias = getattr(p.module, "bias", None) is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            layer = make(structure, in_f, out_f, bias=bias, device=w.device, dtype=dtype or w.dtype, **hp)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {p.name!r} ({out_f} x {in_f}): {err}") from None
    if not w.is_complex() and any(t.is_complex() for t in layer.parameters()):
        raise ValueError(f"layer {p.name!r} ({out_f} x {in_f}): hparams {hp} build a complex-valued "
                         f"{structure} layer in place of a real {w.dtype} one, which would make the model's "
                         f"activations complex; drop complex=True (complex layers are for complex models)")
    return layer


def layer_report(p: Plan, layer: StructuredLinear, *, adds_to_dense: bool = False, **fields: Any) -> LayerReport:
    """The report row of ``p.module`` replaced by ``layer`` (``adds_to_dense``: ``layer`` is a delta beside
    the dense layer, as an adapter's); ``fields``: errors, method, seconds."""
    in_f, out_f = linear_shape(p.module)
    bias = getattr(p.module, "bias", None) is not None
    params, flops = dense_count(in_f, out_f, "params", bias), dense_count(in_f, out_f, "flops")
    return LayerReport(name=p.name, kind="Conv1D" if is_conv1d(p.module) else type(p.module).__name__,
                       in_features=in_f, out_features=out_f, structure=p.structure, hparams=layer.hparams(),
                       params_before=params, params_after=layer.num_params() + (params if adds_to_dense else 0),
                       flops_before=flops, flops_after=layer.flops() + (flops if adds_to_dense else 0), **fields)


def swap_in(model: nn.Module, built: Iterable[tuple[Plan, nn.Module]], *, origin: bool = True) -> None:
    """Put each built module in place of its plan's layer (``origin``: remember the replaced module's type,
    so that densify restores a ``Conv1D`` as a ``Conv1D``); refuse transformers' ``save_pretrained`` on
    ``model`` from now on (it would silently drop the structure)."""
    for p, new in built:
        new.train(p.module.training)
        if origin:
            record_origin(new, p.module)
        set_module(model, p.name, new)
    guard_save_pretrained(model)


def replace_layers(model: nn.Module, plans: list[Plan],
                   build: Callable[[int, Plan], tuple[nn.Module, LayerReport]], *, origin: bool = True
                   ) -> list[LayerReport]:
    """The template: ``build(i, plan)`` for every plan first, then :func:`swap_in` all; the report rows."""
    built = [build(i, p) for i, p in enumerate(plans)]
    swap_in(model, [(p, m) for p, (m, _) in zip(plans, built)], origin=origin)
    return [r for _, r in built]
