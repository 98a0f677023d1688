"""Per-layer budgets by sensitivity: give the parameters to the layers whose truncation costs the most.

A uniform budget gives every targeted layer the same fraction of its weights. The compression literature
(SVD-LLM, ASVD, Dobi-SVD, BLAST) finds that per-layer budgets set by *sensitivity* — how much the model's
output moves when one layer is approximated — beat uniform ones. :func:`allocate_budgets` does this for any
structure, keeping the total of the targeted layers within the same budget:

1. **Error curves.** For every targeted layer, the activation-aware projection error
   ``e_l(h) = ||(W - S_h) C^{1/2}||_F^2`` of each candidate hyperparameter setting ``h`` (``C``: the layer's
   input second moment on the calibration data). For ``lowrank`` the whole curve comes from one SVD: the
   tail energy of the singular values of ``W C^{1/2}`` (the truncation-aware whitening of SVD-LLM); for
   other structures a grid of budgets around the reference is projected (closed forms, no polish). Keeping
   the layer dense (error 0, its full weight count) is always an option.
2. **Sensitivity.** ``s_l = d_l / e_l(h_ref)``: the layer alone is replaced by its projection at the
   reference (uniform) budget, the model is run, and ``d_l`` is the mean squared change of
   ``measure(model)`` (e.g. normalised sentence embeddings: ``2 (1 - cosine)``), per unit of that layer's
   output error.
3. **Allocation.** Minimise ``sum_l s_l e_l(h_l)`` subject to ``sum_l count_l(h_l) <= budget x dense``
   by the greedy marginal rule on each layer's lower convex hull (the largest error reduction per
   parameter first; optimal for convex curves such as a low-rank tail). The result never exceeds the
   total and stops only when no further step of any layer fits.

>>> alloc = allocate_budgets(model, cfg, measure=lambda m: embed(m, sentences))
>>> report = structurize(model, alloc.apply(cfg))       # same total budget, per-layer hyperparameters
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..core.projection import project_layer_
from ..core.registry import get, make
from .budget import choose_hparams, dense_count
from .config import StructureConfig
from .modules import dense_weight, linear_shape, set_module
from .structurize import collect_calibration, match_layers

__all__ = ["Allocation", "LayerAllocation", "allocate_budgets", "error_curve", "greedy_allocation"]

#: multiples of the reference budget projected for structures without a closed-form error curve
GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


@dataclass
class LayerAllocation:
    """One layer's share: ``hparams`` (``None``: keep the dense layer), its weight count, and the numbers
    that decided it."""

    name: str
    structure: str
    hparams: dict[str, Any] | None
    params: int  # weight count (or FLOPs with budget_kind="flops") of the chosen option
    dense_params: int
    reference_params: int  # what the uniform budget gives this layer
    sensitivity: float  # mean squared change of measure(model) per unit of output error
    error: float  # relative activation-aware output error of the chosen option (0 for dense)
    reference_error: float  # the same at the reference (uniform) budget


@dataclass
class Allocation:
    """The per-layer budgets :func:`allocate_budgets` chose (``layers`` in model order)."""

    layers: list[LayerAllocation]
    limit: int  # the total allowed: sum over layers of budget x dense count
    kind: str = "params"
    measure_change: dict[str, float] = field(default_factory=dict)  # d_l per layer (for reports)

    @property
    def total(self) -> int:
        return sum(la.params for la in self.layers)

    @property
    def dense_total(self) -> int:
        return sum(la.dense_params for la in self.layers)

    def hparams(self) -> dict[str, dict[str, Any] | None]:
        return {la.name: la.hparams for la in self.layers}

    def apply(self, config: StructureConfig) -> StructureConfig:
        """A copy of ``config`` that builds exactly this allocation: one override per structured layer
        (its structure and hyperparameters, ``budget=None``) and the layers kept dense added to
        ``exclude_modules``."""
        overrides = dict(config.overrides)
        for la in self.layers:
            if la.hparams is not None:
                overrides[re.escape(la.name)] = {"structure": la.structure, "budget": None, **la.hparams}
        dense = [re.escape(la.name) for la in self.layers if la.hparams is None]
        exclude = config.exclude_modules
        if dense:
            ours = "|".join(dense)
            if exclude is None:
                exclude = f"(?:{ours})"
            elif isinstance(exclude, str):
                exclude = f"(?:{exclude})|(?:{ours})"
            else:  # a list of names or suffixes, as a regex
                exclude = "|".join([rf"(?:.*\.)?{re.escape(e)}" for e in exclude] + dense)
        return replace(config, overrides=overrides, exclude_modules=exclude)

    def to_markdown(self) -> str:
        rows = ["| layer | structure | hyperparameters | of dense | uniform | sensitivity | output error |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for la in self.layers:
            hp = "dense" if la.hparams is None else ", ".join(f"{k}={v}" for k, v in la.hparams.items())
            rows.append(f"| {la.name} | {la.structure if la.hparams is not None else 'dense'} | {hp} | "
                        f"{la.params / la.dense_params:.3f} | {la.reference_params / la.dense_params:.3f} | "
                        f"{la.sensitivity:.3g} | {la.error:.3f} |")
        rows.append(f"| total | | | {self.total / self.dense_total:.4f} | {self.limit / self.dense_total:.4f} "
                    f"(limit) | | |")
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- curves
def _whitened_energy(W: Tensor, cal: Any) -> tuple[Tensor, float]:
    """``(M, ||M||_F^2)`` with ``M = W C^{1/2}`` (``W R^T``, ``R^T R = C``; same singular values)."""
    Wd = W.detach().to(torch.float64)
    if cal is None:
        return Wd, float(Wd.pow(2).sum())
    M = Wd @ cal.root().to(Wd.device).mT
    return M, float(M.pow(2).sum())


def error_curve(structure: str, weight: Tensor, cal: Any, *, kind: str = "params",
                bias: bool = False, fixed: dict | None = None, reference: float | None = None
                ) -> list[tuple[int, float, dict[str, Any] | None]]:
    """``[(count, absolute output error, hparams), ...]`` sorted by count, ending with the dense option
    ``(dense count, 0.0, None)``. ``count`` is the weight count (``kind="params"``) or FLOPs per row.

    ``lowrank``: every rank below the dense count, errors from the whitened spectrum (exact). Other
    structures: the budget solver's choice at ``GRID`` multiples of ``reference`` (a budget fraction),
    each projected by its closed form on the calibration metric.
    """
    out_f, in_f = weight.shape
    dense = dense_count(in_f, out_f, kind, False)
    cls = get(structure)
    fixed = dict(fixed or {})
    M, total = _whitened_energy(weight, cal)
    points: dict[int, tuple[float, dict[str, Any] | None]] = {}
    if structure == "lowrank" and not (set(fixed) - {"rank"}) and "rank" not in fixed:
        sv2 = torch.linalg.svdvals(M).pow(2)  # fewer than min(in, out) when C is rank-deficient: pad
        sv2 = torch.cat([sv2, sv2.new_zeros(max(min(in_f, out_f) - sv2.numel(), 0))])
        tail = (sv2.sum() - torch.cumsum(sv2, 0)).clamp_min(0)  # tail[r-1] = error at rank r
        for r in range(1, min(in_f, out_f) + 1):
            n = cls.flop_count(in_f, out_f, rank=r) if kind == "flops" else cls.param_count(in_f, out_f, rank=r)
            if n >= dense:
                break
            points[n] = (float(tail[r - 1]), {"rank": r})
    else:
        if reference is None:
            raise ValueError(f"error_curve: structure {structure!r} needs a reference budget fraction")
        Wd = weight.detach()
        for mult in GRID:
            b = reference * mult
            if b >= 1:
                break
            try:
                hp = choose_hparams(structure, in_f, out_f, b, kind=kind, bias=bias, fixed=fixed)[0]
            except ValueError:
                continue
            layer = make(structure, in_f, out_f, bias=False, dtype=torch.float64, device=Wd.device, **hp)
            res = project_layer_(layer, Wd.to(torch.float64), None, calibration=cal, refine=False, steps=0)
            n = layer.flops() if kind == "flops" else cls.param_count(in_f, out_f, **hp)
            if n >= dense:
                continue
            err = (res.output_error if res.output_error is not None else res.weight_error) ** 2 * total
            if n not in points or err < points[n][0]:
                points[n] = (err, dict(hp))
    curve = [(n, e, hp) for n, (e, hp) in sorted(points.items())]
    curve.append((dense, 0.0, None))
    return curve


def _hull(curve: list[tuple[int, float, Any]], weight: float) -> list[int]:
    """Indices of the lower convex hull of ``(count, weight x error)`` from the cheapest point, keeping only
    points that lower the error (later points that do not are dominated)."""
    pts: list[int] = []
    for i, (_n, e, _) in enumerate(curve):
        if pts and weight * e >= weight * curve[pts[-1]][1] and weight > 0:
            continue
        pts.append(i)
    hull: list[int] = []
    for i in pts:
        while len(hull) >= 2:
            a, b = curve[hull[-2]], curve[hull[-1]]
            c = curve[i]
            # b lies on or above the chord a-c: drop it (slopes must increase, i.e. gains per count decrease)
            if (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_allocation(curves: list[list[tuple[int, float, Any]]], weights: list[float], limit: float
                      ) -> list[int]:
    """Index into each curve minimising ``sum_l weights[l] x error_l`` with ``sum_l count_l <= limit``.

    Every layer starts at its cheapest point; steps along each layer's lower convex hull are taken in
    order of error reduction per unit of count (a layer's steps in their own order); a step that does
    not fit stops that layer, and the others go on until none fits. Raises ``ValueError`` when even the
    cheapest points exceed ``limit``.
    """
    hulls = [_hull(c, w) for c, w in zip(curves, weights)]
    pos = [0] * len(curves)
    used = sum(c[h[0]][0] for c, h in zip(curves, hulls))
    if used > limit:
        raise ValueError(f"the cheapest option of every layer already needs {used:,} > {int(limit):,}; raise the "
                         f"budget or target fewer layers")
    steps = []
    for li, (c, h, w) in enumerate(zip(curves, hulls, weights)):
        for k in range(1, len(h)):
            a, b = c[h[k - 1]], c[h[k]]
            gain = w * (a[1] - b[1]) / max(b[0] - a[0], 1)
            steps.append((-gain, li, k))
    steps.sort()
    blocked = [False] * len(curves)
    for _neg, li, k in steps:
        if blocked[li] or pos[li] != k - 1:
            continue
        c, h = curves[li], hulls[li]
        extra = c[h[k]][0] - c[h[k - 1]][0]
        if used + extra <= limit:
            used += extra
            pos[li] = k
        else:
            blocked[li] = True
    # the greedy may leave room that a blocked layer's smaller non-hull points could use: fill it
    idx = [h[p] for h, p in zip(hulls, pos)]
    improved = True
    while improved:
        improved = False
        best = None
        for li, c in enumerate(curves):
            i = idx[li]
            for j in range(i + 1, len(c)):
                extra = c[j][0] - c[i][0]
                if used + extra > limit:
                    break
                gain = weights[li] * (c[i][1] - c[j][1])
                if gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, li, j, extra)
        if best is not None:
            _, li, j, extra = best
            idx[li], used, improved = j, used + extra, True
    return idx


# ---------------------------------------------------------------------------------------------- driver
def _mean_sq_change(a: Tensor, b: Tensor) -> float:
    d = (a.to(torch.float64) - b.to(torch.float64)).reshape(a.shape[0] if a.dim() > 1 else 1, -1)
    return float(d.pow(2).sum(-1).mean())


def allocate_budgets(model: nn.Module, config: StructureConfig, calibration: Any = None, *,
                     measure: Callable[[nn.Module], Tensor],
                     progress: Callable[[str], None] | None = None) -> Allocation:
    """Per-layer hyperparameters for ``structurize(model, config)`` chosen by sensitivity, with the same total
    budget as ``config`` (the sum over the targeted layers of each layer's budget x its dense count).

    ``calibration`` (default ``config.calibration``): inputs for the activation-aware errors, as in
    :class:`StructureConfig`. ``measure(model) -> Tensor``: what the model should keep (e.g. sentence
    embeddings on a few hundred texts); a layer's sensitivity is the mean squared change of it (per row)
    when that layer alone is projected at the uniform budget, per unit of its output error.
    ``progress(line)``: called once per layer with a one-line summary. The model is not changed (each trial
    layer is swapped in and out). Apply the result with ``structurize(model, allocation.apply(config))``.
    """
    if not callable(measure):
        raise TypeError(f"allocate_budgets: measure must be a callable model -> Tensor, got {type(measure).__name__}")
    if config.init != "project":
        raise ValueError("allocate_budgets: sensitivities are measured on projected layers; use init='project'")
    plans = match_layers(model, config)
    missing = [p.name for p in plans if p.budget is None]
    if missing:
        raise ValueError(f"allocate_budgets: layer {missing[0]!r} has no budget (budget=None); give every "
                         f"targeted layer a budget fraction, e.g. StructureConfig(budget=0.25)")
    kind = config.budget_kind
    cal_spec = config.calibration if calibration is None else calibration
    cals = collect_calibration(model, [p.name for p in plans], cal_spec) if cal_spec is not None else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = measure(model).detach().clone()
        curves, sens, refs, changes = [], [], [], {}
        limit = 0.0
        for i, p in enumerate(plans):
            in_f, out_f = linear_shape(p.module)
            W = dense_weight(p.module).detach()
            bias = getattr(p.module, "bias", None) is not None
            cal = cals.get(p.name)
            dense = dense_count(in_f, out_f, kind, False)
            assert p.budget is not None  # allocate_budgets refuses configs without a budget up front
            limit += p.budget * dense
            curve = error_curve(p.structure, W, cal, kind=kind, bias=bias, fixed=p.fixed, reference=p.budget)
            hp_ref = choose_hparams(p.structure, in_f, out_f, p.budget, kind=kind, bias=bias, fixed=p.fixed,
                                    where=f"layer {p.name!r} ({out_f} x {in_f})")[0]
            trial = make(p.structure, in_f, out_f, bias=bias, device=W.device, dtype=W.dtype, **hp_ref)
            b = getattr(p.module, "bias", None)
            res = project_layer_(trial, W, None if b is None else b.detach(), calibration=cal, steps=0,
                                 refine=False)
            rel = res.output_error if res.output_error is not None else res.weight_error
            _, total = _whitened_energy(W, cal)
            err_ref = rel ** 2 * total
            trial.train(p.module.training)
            set_module(model, p.name, trial)
            try:
                with torch.no_grad():
                    d = _mean_sq_change(measure(model), base)
            finally:
                set_module(model, p.name, p.module)
            changes[p.name] = d
            s = d / err_ref if err_ref > 0 else math.nan
            n_ref = get(p.structure).flop_count(in_f, out_f, **hp_ref) if kind == "flops" else \
                get(p.structure).param_count(in_f, out_f, **hp_ref)
            curves.append(curve)
            sens.append(s)
            refs.append((n_ref, rel))
            if progress is not None:
                progress(f"sensitivity {i + 1}/{len(plans)} {p.name}: {p.structure} {hp_ref} output error "
                         f"{rel:.3f}, measure change {d:.3g}")
        finite = [s for s in sens if math.isfinite(s)]
        fallback = sorted(finite)[len(finite) // 2] if finite else 1.0
        sens = [s if math.isfinite(s) else fallback for s in sens]
        idx = greedy_allocation(curves, sens, limit)
    finally:
        model.train(was_training)
    layers = []
    for p, curve, s, (n_ref, rel_ref), k in zip(plans, curves, sens, refs, idx):
        n, e, hp = curve[k]
        in_f, out_f = linear_shape(p.module)
        _, total = _whitened_energy(dense_weight(p.module), cals.get(p.name))
        layers.append(LayerAllocation(
            name=p.name, structure=p.structure, hparams=None if hp is None else copy.deepcopy(hp), params=n,
            dense_params=dense_count(in_f, out_f, kind, False), reference_params=n_ref, sensitivity=s,
            error=math.sqrt(e / total) if total > 0 else 0.0, reference_error=rel_ref))
    return Allocation(layers, int(limit), kind, changes)
