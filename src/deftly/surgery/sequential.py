"""Sequential, error-correcting projection: each layer reproduces the *original* model's layer output from
the inputs it receives in the *compressed* model.

:func:`deftly.structurize` projects every layer on its own inputs in the original model: the errors of
the layers before it are ignored, and they compound through the network. :func:`structurize_sequential`
goes stage by stage in model order (a stage is a group of layers, e.g. a transformer block's query, key and
value, which share their input); for each layer of a stage it runs the original model (``reference``) and
the partly compressed one (``model``) on the same calibration batches and accumulates, in float64,

    C_ss = E[x_s x_s^T],   C_ts = E[x_t x_s^T],   C_tt = E[x_t x_t^T]

(``x_t``: the layer's input in the reference, ``x_s``: in the compressed model, the same tokens). The
weight that best maps the compressed inputs to the reference outputs is the least-squares correction
``A = W C_ts (C_ss + lambda I)^{-1}`` (``lambda``: ``ridge`` x the mean eigenvalue of ``C_ss``), and
the structured layer is the activation-aware projection of ``A`` on the metric ``C_ss``: for low rank,
the truncation of ``A C_ss^{1/2}`` (the truncation-aware whitening of SVD-LLM, applied to the corrected
weight). Since ``||X_t W^T - X_s S^T||^2 = ||X_t W^T - X_s A^T||^2 + ||(A - S) C_ss^{1/2}||^2`` (the
residual of the least-squares fit is orthogonal), this minimises the layer's output error against the
reference among the structure's matrices (exactly for closed-form structures), and each layer corrects
part of what the layers before it lost. The bias is kept. When the uncorrected projection of ``W`` is
better on the calibration data (no upstream error, where the ridge only shrinks), it is kept instead.

Each layer's report gives ``output_error`` = ``||X_t W^T - X_s S^T|| / ||X_t W^T||`` (relative, on the
calibration tokens) and ``plain_output_error``: the same for the projection of ``W`` itself on ``C_ss``
(what ignoring the upstream errors would give).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.projection import Calibration, project_layer_
from .budget import choose_hparams
from .config import StructureConfig
from .modules import dense_weight, linear_shape, model_params
from .report import LayerReport, SurgeryReport
from .template import build_layer, layer_report, match_layers, swap_in

__all__ = ["structurize_sequential"]


class _Stop(Exception):
    """Raised by a hook once every layer of the stage has run: the rest of the forward is not needed."""


def _items(calibration: Any) -> list[Any]:
    items = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration]
    for item in items:
        if not (callable(item) or isinstance(item, (dict, Tensor))):
            raise TypeError(f"structurize_sequential: calibration items must be dicts of model inputs, tensors or "
                            f"callables f(model), got {type(item).__name__}")
    return items


def _run(model: nn.Module, item: Any) -> None:
    try:
        if isinstance(item, dict):
            model(**item)
        elif isinstance(item, Tensor):
            model(item)
        else:  # a callable runs as a whole (it may hold several batches): no early stop
            item(model)
    except _Stop:
        pass


def _moments(reference: nn.Module, model: nn.Module, names: Sequence[str], items: list[Any]
             ) -> dict[str, list[Any]]:
    """``{name: [rows, C_ss, C_ts, C_tt]}`` (sums) for the stage's layers, reference and model run on the
    same items; each forward stops once all the stage's layers have run (dict and tensor items)."""
    acc: dict[str, list[Any]] = {n: [0, 0.0, 0.0, 0.0] for n in names}
    seen_t: dict[str, list[Tensor]] = {}
    fired: set[str] = set()
    early = [True]

    def last(name: str) -> None:
        fired.add(name)
        if early[0] and len(fired) == len(names):
            raise _Stop

    def ref_hook(mod, args, out, _n):
        seen_t.setdefault(_n, []).append(args[0].detach())
        last(_n)

    def model_hook(mod, args, out, _n):
        calls = seen_t.get(_n, [])
        if not calls:
            raise ValueError(f"structurize_sequential: layer {_n!r} ran in the model but not in the reference on "
                             "the same calibration input; are they the same architecture?")
        xt = calls.pop(0)
        xs = args[0].detach()
        if xt.shape != xs.shape:
            raise ValueError(f"structurize_sequential: layer {_n!r} got inputs of shape {tuple(xt.shape)} in the "
                             f"reference but {tuple(xs.shape)} in the model")
        xt = xt.reshape(-1, xt.shape[-1]).to(torch.float64)
        xs = xs.reshape(-1, xs.shape[-1]).to(torch.float64)
        a = acc[_n]
        a[0] += xs.shape[0]
        a[1] = a[1] + xs.mT @ xs
        a[2] = a[2] + xt.mT @ xs
        a[3] = a[3] + xt.mT @ xt
        last(_n)

    handles = []
    try:
        for n in names:
            handles.append(reference.get_submodule(n).register_forward_hook(
                lambda m, a, o, _n=n: ref_hook(m, a, o, _n)))
            handles.append(model.get_submodule(n).register_forward_hook(
                lambda m, a, o, _n=n: model_hook(m, a, o, _n)))
        with torch.no_grad():
            for item in items:
                early[0] = not callable(item) or isinstance(item, (dict, Tensor))
                seen_t.clear()
                fired.clear()
                _run(reference, item)
                fired.clear()
                _run(model, item)
    finally:
        for h in handles:
            h.remove()
    empty = [n for n, a in acc.items() if a[0] == 0]
    if empty:
        raise ValueError(f"structurize_sequential: the calibration never reached layer {empty[0]!r}; make it run "
                         "a forward pass through every targeted layer")
    return acc


def _rel_error(W: Tensor, S: Tensor, css: Tensor, cts: Tensor, ctt: Tensor) -> float:
    """``||X_t W^T - X_s S^T|| / ||X_t W^T||`` from the moments."""
    ref = float(((W @ ctt) * W).sum())
    err = ref - 2.0 * float(((W @ cts) * S).sum()) + float(((S @ css) * S).sum())
    return (max(err, 0.0) / ref) ** 0.5 if ref > 0 else max(err, 0.0) ** 0.5


def structurize_sequential(model: nn.Module, config: StructureConfig, reference: nn.Module, *,
                           stages: Sequence[Sequence[str]] | None = None, ridge: float = 1e-3,
                           progress: Callable[[str], None] | None = None) -> SurgeryReport:
    """Structurize ``model`` in place like :func:`deftly.structurize` (same targets, budgets, overrides and
    hyperparameter choice), but project each layer sequentially against ``reference`` (see the module
    docstring). ``reference``: the original model (e.g. a copy taken before any surgery), left unchanged;
    ``model`` must have the same architecture and, at the start, the same weights.

    ``config.calibration``: dicts of model inputs or tensors (one per batch; each forward stops as soon as
    the stage's layers have run) or callables ``f(model)``. ``stages``: groups of targeted layer names in
    the order to project them (default: one layer per stage, in model order); layers that share an input
    can share a stage. ``ridge``: regularisation of the least-squares correction, relative to the mean
    eigenvalue of ``C_ss``. ``progress(line)``: called after each layer.
    """
    if not isinstance(reference, nn.Module):
        raise TypeError(f"structurize_sequential: reference must be the original torch.nn.Module, got "
                        f"{type(reference).__name__}")
    if reference is model:
        raise ValueError("structurize_sequential: reference must be a separate copy of the original model "
                         "(e.g. copy.deepcopy(model) before the surgery), not the model being changed")
    if config.init != "project":
        raise ValueError("structurize_sequential projects pretrained weights; use init='project' (or "
                         "deftly.structurize for init='random')")
    if config.calibration is None:
        raise ValueError("structurize_sequential needs calibration inputs (StructureConfig(calibration=...)): "
                         "the correction is fitted on them")
    if not ridge >= 0:
        raise ValueError(f"structurize_sequential: ridge={ridge!r} must be >= 0, e.g. 1e-3")
    plans = {p.name: p for p in match_layers(model, config)}
    order = list(plans)
    if stages is None:
        stages = [[n] for n in order]
    stages = [list(s) for s in stages]
    listed = [n for s in stages for n in s]
    unknown = [n for n in listed if n not in plans]
    missing = [n for n in order if n not in listed]
    if unknown or missing or len(set(listed)) != len(listed):
        raise ValueError(f"structurize_sequential: stages must list every targeted layer once; unknown: "
                         f"{unknown[:3]}, missing: {missing[:3]}, repeated: "
                         f"{sorted({n for n in listed if listed.count(n) > 1})[:3]}")
    items = _items(config.calibration)
    before_total = model_params(model)
    kind = config.budget_kind
    reports: list[LayerReport] = []
    for stage in stages:
        t0 = time.perf_counter()
        mom = _moments(reference, model, stage, items)
        for name in stage:
            p = plans[name]
            in_f, out_f = linear_shape(p.module)
            bias = getattr(p.module, "bias", None) is not None
            hp = choose_hparams(p.structure, in_f, out_f, p.budget, kind=kind, bias=bias, fixed=p.fixed,
                                where=f"layer {p.name!r} ({out_f} x {in_f})")[0]
            rows, css, cts, ctt = mom[name]
            css, cts, ctt = css / rows, cts / rows, ctt / rows
            W = dense_weight(p.module).detach().to(torch.float64)
            lam = ridge * float(css.diagonal().mean())
            reg = css + lam * torch.eye(in_f, dtype=css.dtype, device=css.device)
            A = torch.linalg.solve(reg, cts.mT @ W.mT).mT  # W C_ts (C_ss + lam I)^-1
            cal = Calibration.from_covariance(css, rows)
            b = getattr(p.module, "bias", None)
            b = None if b is None else b.detach()
            w_ref = dense_weight(p.module)
            layer = build_layer(p, hp, config.seed)
            plain = build_layer(p, hp, config.seed, dtype=torch.float64)
            res = project_layer_(layer, A.to(w_ref.device), b, calibration=cal, seed=config.seed, steps=config.steps)
            plain_res = project_layer_(plain, W, None if b is None else b.to(torch.float64), calibration=cal,
                                       seed=config.seed, steps=0, refine=False)
            S = layer.to_dense().detach().to(torch.float64)
            err = _rel_error(W, S, css, cts, ctt)
            plain_err = _rel_error(W, plain.to_dense().detach().to(torch.float64), css, cts, ctt)
            method = f"sequential+{res.method}"
            if plain_err < err:  # e.g. no upstream error and the ridge only shrinks: keep the uncorrected one
                layer.load_state_dict(plain.state_dict())  # copied into the layer's dtype: the measured one
                res, err, method = plain_res, plain_err, f"sequential (uncorrected)+{plain_res.method}"
            swap_in(model, [(p, layer)])  # stage by stage: the next stage's inputs come from this one
            reports.append(layer_report(p, layer, error=res.weight_error, output_error=err,
                                        plain_output_error=plain_err, method=method,
                                        seconds=time.perf_counter() - t0))
            if progress is not None:
                hps = ", ".join(f"{k}={v}" for k, v in layer.hparams().items())
                progress(f"sequential {len(reports)}/{len(order)} {name}: {p.structure} {hps}, output error vs "
                         f"the original {err:.3f} (uncorrected projection {plain_err:.3f})")
    return SurgeryReport(reports, before_total, model_params(model), structure=config.structure,
                         budget=config.budget, budget_kind=kind, action="structurize_sequential")
