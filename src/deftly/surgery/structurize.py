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
from typing import Any

import torch
from torch import Tensor, nn

from ..core.projection import Calibration, project_layer_
from ..core.registry import make
from .budget import choose_hparams
from .config import StructureConfig
from .modules import dense_weight, linear_shape, model_params
from .report import LayerReport, SurgeryReport
from .template import Plan, build_layer, layer_report, match_layers, replace_layers

__all__ = ["collect_calibration", "match_layers", "structurize"]


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
    except RuntimeError as err:  # e.g. inputs of the wrong width for a layer that is not targeted
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"running the calibration data through the model failed ({first}); pass inputs the "
                         f"model accepts as it is called in training (a tensor, a dict of keyword inputs or a "
                         f"callable f(model))") from err
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


def _latency_choice(p: Plan, config: StructureConfig, in_f: int, out_f: int,
                    bias: bool) -> tuple[str, dict[str, Any]]:
    """The (structure, hyperparameters) meeting ``p.budget`` x the dense layer's measured time, with the
    least closed-form projection error of this layer's weight (``init="project"``) or the most parameters."""
    from .latency import choose, progress

    error = None
    if config.init == "project":
        w = dense_weight(p.module).detach()

        def error(structure: str, hp: dict[str, Any]) -> float:
            trial = make(structure, in_f, out_f, bias=False, device=w.device, dtype=w.dtype, **hp)
            return project_layer_(trial, w, None, seed=config.seed, refine=False, steps=0).error

    best = choose(in_f, out_f, p.budget or 1.0, config.candidates, config.latency, bias=bias, error=error,
                  where=f"layer {p.name!r} ({out_f} x {in_f})", log=progress)
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

    def build(i: int, p: Plan) -> tuple[nn.Module, LayerReport]:  # the template's hook
        cands = choices[i]
        if config.init == "random":
            layer = build_layer(p, cands[0], config.seed + i)
            return layer, layer_report(p, layer, method="random init")
        w = dense_weight(p.module).detach()
        b = getattr(p.module, "bias", None)
        b = None if b is None else b.detach()
        cal = cals.get(p.name)
        hp = cands[0]
        if len(cands) > 1:  # rank the shortlist by the closed-form error (no L-BFGS polish)
            trials = []
            for c in cands:
                trial = build_layer(p, c, config.seed + i)
                trials.append((project_layer_(trial, w, b, calibration=cal, seed=config.seed, refine=False,
                                              steps=config.steps).error, c))
            hp = min(trials, key=lambda t: t[0])[1]
        layer = build_layer(p, hp, config.seed + i)
        res = project_layer_(layer, w, b, calibration=cal, seed=config.seed, steps=config.steps)
        return layer, layer_report(p, layer, error=res.weight_error, output_error=res.output_error,
                                   plain_output_error=res.plain_output_error, method=res.method,
                                   seconds=res.seconds)

    reports = replace_layers(model, plans, build)  # nothing is swapped until every layer is built
    return SurgeryReport(reports, before_total, model_params(model), structure=config.structure,
                         budget=config.budget, budget_kind=kind)
