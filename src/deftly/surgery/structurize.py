"""Model surgery: replace the dense layers of any PyTorch / Hugging Face model by structured ones.

>>> cfg = deftly.StructureConfig(structure="monarch", target_modules="all-linear", budget=0.25)
>>> report = deftly.structurize(model, cfg)      # in place; returns a report
>>> print(report)                                # per layer and totals, as a table

* **Which layers.** ``target_modules`` is a regex matched against the full module name
  (``re.fullmatch``), a list of exact names or name suffixes (``["query", "value"]`` matches
  ``encoder.layer.0.attention.self.query`` ...), or ``"all-linear"``: every ``nn.Linear`` and Hugging Face
  ``Conv1D`` except the output head (a Hugging Face model's ``get_output_embeddings()``; for other
  models, the last linear layer). ``exclude_modules`` takes the same forms. Layers that are already
  structured, and the frozen base layers of adapters, are never candidates. A pattern that matches
  nothing is an error listing the candidate names.
* **Budget.** ``budget`` is a fraction: every targeted layer gets at most ``budget`` times its dense
  weight entries (biases stay dense and are not counted; or its FLOPs per token with
  ``budget_kind="flops"``). The one budget solver (:func:`deftly.surgery.budget.choose_hparams`, also used
  by the recipes) walks the structure's :meth:`~deftly.StructuredLinear.hparam_candidates`; among the
  candidates within 10% of the fullest count it takes the structure's preferred shape
  (:meth:`~deftly.StructuredLinear.shape_score`: divisors over padding, square Monarch blocks with the rank
  filling the budget, two BTT cores) (``select="params"``), or, with ``select="error"``, projects the best
  few candidates near the budget and keeps the one with the smallest projection error.
* **Init.** ``"project"`` (default): the best structured approximation of each pretrained weight
  (:mod:`deftly.core.projection`), activation-aware when ``calibration`` inputs are given; ``"random"``: the
  structure's own init (training from scratch in the same architecture).
* **Overrides.** ``overrides={pattern: {...}}`` sets, for the layers a pattern matches, another
  ``structure``, ``budget`` or hyperparameters (partial hyperparameters fix those and leave the rest to
  the budget).
* **Meta device.** On a model built on the meta device (``with torch.device("meta"): ...``) only
  ``init="random"`` applies: the structured layers are built on meta too (nothing is allocated; then
  ``model.to_empty(device=...)`` and ``reset_parameters()`` / ``load_state_dict``); ``"project"`` is
  refused (there are no weights to project). :func:`deftly.plan` counts a structurized model this way.
* **Atomic.** Everything is planned, checked, built and projected before the first module is swapped:
  an error leaves the model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear
from ..core.projection import Calibration, project_layer_
from ..core.registry import make
from .budget import choose_hparams, dense_count
from .config import _CONFIG_KEYS, StructureConfig, _match, _override_matches
from .marks import guard_save_pretrained, record_origin
from .modules import (
    dense_weight,
    is_conv1d,
    linear_modules,
    linear_shape,
    model_params,
    output_head,
    set_module,
)
from .report import LayerReport, SurgeryReport

__all__ = ["collect_calibration", "match_layers", "structurize"]


@dataclass
class _Plan:
    name: str
    module: nn.Module
    structure: str
    budget: float | None
    fixed: dict[str, Any]




def match_layers(model: nn.Module, config: StructureConfig) -> list[_Plan]:
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
        plans.append(_Plan(n, by_name[n], structure, budget, fixed))
    return plans


def _run_calibration(model: nn.Module, calibration: Any) -> None:
    items = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    for item in items:
        if callable(item) and not isinstance(item, (Tensor, dict)):
            item(model)
        elif isinstance(item, dict):
            model(**item)
        elif isinstance(item, Tensor):
            model(item)
        else:
            raise TypeError(f"calibration items must be callables f(model), dicts of inputs or tensors, "
                            f"got {type(item).__name__}")


def collect_calibration(model: nn.Module, names: Sequence[str], calibration: Any) -> dict[str, Any]:
    """Run ``calibration`` through ``model`` and return ``{name: Calibration}`` of each named layer's
    inputs (the second moment ``X^T X / n``, accumulated in float64 by forward pre-hooks)."""
    cals: dict[str, Calibration] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        in_f = linear_shape(mod)[0]
        cals[name] = Calibration(in_features=in_f, name=name)

        def hook(module, args, _name=name):
            cals[_name].add(args[0].detach())

        handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [n for n, c in cals.items() if c.count == 0 and c.batches]
    if empty:
        raise ValueError(f"calibration data is empty: {len(empty)} targeted layer(s) (e.g. {empty[0]!r}) saw "
                         f"only batches of 0 rows; pass calibration inputs with at least one sample")
    unreached = [n for n, c in cals.items() if c.count == 0]
    if unreached:
        raise ValueError(f"calibration never reached {len(unreached)} targeted layer(s) (e.g. "
                         f"{unreached[0]!r}); make the calibration run a forward pass through them")
    return cals


def _build(p: _Plan, hp: dict, seed: int) -> StructuredLinear:
    in_f, out_f = linear_shape(p.module)
    w = dense_weight(p.module)
    bias = getattr(p.module, "bias", None) is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            layer = make(p.structure, in_f, out_f, bias=bias, device=w.device, dtype=w.dtype, **hp)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {p.name!r} ({out_f} x {in_f}): {err}") from None
    return layer


def _latency_choice(p: _Plan, config: StructureConfig, in_f: int, out_f: int,
                    bias: bool) -> tuple[str, dict[str, Any]]:
    """The (structure, hyperparameters) meeting ``p.budget`` x the dense layer's measured time, with the
    least closed-form projection error of this layer's weight (``init="project"``) or the most parameters."""
    from .latency import choose

    error = None
    if config.init == "project":
        w = dense_weight(p.module).detach()

        def error(structure: str, hp: dict[str, Any]) -> float:
            trial = make(structure, in_f, out_f, bias=False, device=w.device, dtype=w.dtype, **hp)
            return project_layer_(trial, w, None, seed=config.seed, refine=False, steps=0).error

    best = choose(in_f, out_f, p.budget or 1.0, config.candidates, config.latency, bias=bias, error=error,
                  where=f"layer {p.name!r} ({out_f} x {in_f})")
    return best.structure, dict(best.hparams)


def structurize(model: nn.Module, config: StructureConfig) -> SurgeryReport:
    """Replace the targeted dense layers of ``model`` by structured ones, in place; return the report.

    See :mod:`deftly.surgery` for the matching, budget and init rules. The model keeps its device,
    dtype and train/eval mode; an error (bad pattern, impossible budget...) leaves it unchanged.
    """
    plans = match_layers(model, config)
    meta = [p.name for p in plans if dense_weight(p.module).is_meta]
    if meta and config.init != "random":
        raise ValueError(f"structurize: {len(meta)} targeted layer(s) (e.g. {meta[0]!r}) are on the meta "
                         f"device, which holds no weights to project (init={config.init!r}); materialise "
                         f"the model first (model.to_empty(device=...) then load its weights), or pass "
                         f"init='random' to build the structured layers on the meta device too")
    before_total = model_params(model)
    kind = config.budget_kind
    shortlist = config.max_trials if config.init == "project" else 1
    slack = config.slack if config.select == "error" else 0.0
    choices: list[list[dict]] = []
    solved: dict[tuple, list[dict]] = {}  # layers of one shape and plan share the solver's answer
    for p in plans:
        in_f, out_f = linear_shape(p.module)
        bias = getattr(p.module, "bias", None) is not None
        if kind == "latency":  # structure and hyperparameters from measured timings, per layer
            p.structure, hp = _latency_choice(p, config, in_f, out_f, bias)
            choices.append([hp])
            continue
        key = (p.structure, in_f, out_f, p.budget, bias, repr(sorted(p.fixed.items())))
        if key not in solved:
            solved[key] = choose_hparams(p.structure, in_f, out_f, p.budget, kind=kind, bias=bias,
                                         fixed=p.fixed, shortlist=shortlist, slack=slack,
                                         where=f"layer {p.name!r} ({out_f} x {in_f})")
        choices.append([dict(hp) for hp in solved[key]])
    cals = (collect_calibration(model, [p.name for p in plans], config.calibration)
            if config.calibration is not None and config.init == "project" else {})
    new_layers: list[StructuredLinear] = []
    reports: list[LayerReport] = []
    for i, (p, cands) in enumerate(zip(plans, choices)):
        in_f, out_f = linear_shape(p.module)
        w = dense_weight(p.module).detach()
        b = getattr(p.module, "bias", None)
        b = None if b is None else b.detach()
        cal = cals.get(p.name)
        res = None
        if config.init == "random":
            layer = _build(p, cands[0], config.seed + i)
        else:
            if len(cands) > 1:  # rank the shortlist by the closed-form error (no L-BFGS polish)
                trials = []
                for hp in cands:
                    trial = _build(p, hp, config.seed + i)
                    trials.append((project_layer_(trial, w, b, calibration=cal, seed=config.seed,
                                                  refine=False, steps=config.steps).error, hp))
                hp = min(trials, key=lambda t: t[0])[1]
            else:
                hp = cands[0]
            layer = _build(p, hp, config.seed + i)
            res = project_layer_(layer, w, b, calibration=cal, seed=config.seed, steps=config.steps)
        layer.train(p.module.training)
        new_layers.append(layer)
        bias = b is not None
        reports.append(LayerReport(
            name=p.name, kind="Conv1D" if is_conv1d(p.module) else type(p.module).__name__,
            in_features=in_f, out_features=out_f, structure=p.structure, hparams=layer.hparams(),
            params_before=dense_count(in_f, out_f, "params", bias), params_after=layer.num_params(),
            flops_before=dense_count(in_f, out_f, "flops"), flops_after=layer.flops(),
            error=None if res is None else res.weight_error,
            output_error=None if res is None else res.output_error,
            plain_output_error=None if res is None else res.plain_output_error,
            method="random init" if res is None else res.method, seconds=0.0 if res is None else res.seconds))
    for p, layer in zip(plans, new_layers):
        record_origin(layer, p.module)  # densify restores a Conv1D as a Conv1D
        set_module(model, p.name, layer)
    guard_save_pretrained(model)  # transformers' save_pretrained would lose the structure: refuse it
    return SurgeryReport(reports, before_total, model_params(model), structure=config.structure,
                         budget=config.budget, budget_kind=kind)
