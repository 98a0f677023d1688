"""Structured adapters: a frozen dense layer plus a trainable structured delta (LoRA and beyond).

``deftly.adapt(model, StructureConfig(structure="lowrank", hparams={"rank": 8}, target_modules=[...]))``
wraps every targeted ``nn.Linear`` / ``Conv1D`` in a :class:`StructuredAdapter`:

    y = base(x) + scale * delta(x)

``base`` keeps its pretrained weight, frozen; ``delta`` is any registered structure (``lowrank`` = LoRA,
``monarch``, ``blockdiag``, ...; chosen by hyperparameters or by a parameter ``budget`` relative to the
dense layer) without bias, initialised so that ``delta`` is exactly zero while its gradient is not (the
LoRA recipe: one factor zero, see :func:`zero_delta_init_`). A structure with a fixed residual (``lrbd``'s
identity) contributes only its learned part. :meth:`StructuredAdapter.merge` folds ``scale * delta`` into
the base weight (the forward is then one dense matmul) and :meth:`~StructuredAdapter.unmerge` takes it
out again.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear
from .budget import choose_hparams
from .config import StructureConfig, _matches_entry
from .modules import is_conv1d, linear_shape, model_params, set_module, structured_modules
from .report import LayerReport, SurgeryReport
from .template import Plan, build_layer, layer_report, match_layers, replace_layers

__all__ = [
    "Adapters",
    "StructuredAdapter",
    "adapt",
    "learned_dense",
    "merge",
    "merge_and_unload",
    "unmerge",
    "zero_delta_init_",
]


def learned_dense(layer: StructuredLinear) -> Tensor:
    """``to_dense()`` without the structure's fixed (non-learned) part, ``(out, in)``."""
    dense = layer.to_dense()
    if layer.has_fixed_residual:
        eye = torch.eye(layer.in_features, dtype=dense.dtype, device=dense.device)
        dense = dense - layer.fixed_residual(eye).mT
    return dense


def zero_delta_init_(layer: StructuredLinear) -> bool:
    """Make the learned part of ``layer`` exactly zero while keeping its gradient alive, in place.

    Uses the structure's own ``zero_delta_init_()`` method if it has one; otherwise zeroes the
    structure's parameters from the last one backwards until the learned map vanishes: one factor of a
    product (LoRA's ``U``, Monarch's ``L``), every term of a sum (``lrbd``: the block-diagonal weight and
    ``U``). Returns False (parameters restored) when that leaves no gradient at all (all factors in one
    tensor, e.g. a butterfly's twiddles): :func:`adapt` then anchors the delta instead (see
    :class:`StructuredAdapter`).
    """
    own = getattr(type(layer), "zero_delta_init_", None)
    if own is not None:
        own(layer)
        return True
    params = [p for n, p in layer.named_parameters() if n != "bias"]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in reversed(params):
            p.zero_()
            if not bool(learned_dense(layer).abs().amax() > 0):
                break
    if params and not _gradient_alive(layer):
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        return False
    return True


def _weight(module: nn.Module) -> Tensor:
    """The ``weight`` tensor of a base layer (``nn.Linear`` or ``Conv1D``), as stored."""
    return cast(Tensor, module.weight)


def _gradient_alive(layer: StructuredLinear) -> bool:
    gen = torch.Generator().manual_seed(0)
    dt = layer.weight_dtype
    x = torch.randn(3, layer.in_features, generator=gen, dtype=torch.float64).to(dt if dt.is_floating_point
                                                                                 else torch.float64)
    y = layer(x)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    ps = [p for n, p in layer.named_parameters() if n != "bias"]
    grads = torch.autograd.grad((y * g).real.sum(), ps, allow_unused=True)
    return any(gr is not None and bool(gr.abs().amax() > 0) for gr in grads)


class StructuredAdapter(nn.Module):
    """``y = base(x) + scale * delta(x)`` with a frozen ``base`` (``nn.Linear`` or ``Conv1D``).

    ``merge()`` adds ``scale * delta`` into ``base.weight`` (forward = base only); ``unmerge()`` removes it.
    With an ``anchor`` (a frozen copy of the delta at its random init, for structures that cannot be
    zeroed without killing their gradient) the delta is ``delta(x) - anchor(x)``: zero at init, any
    structure.
    """

    #: surgery treats adapters like structured layers: never a candidate for more surgery
    is_deftly_adapter = True

    base: nn.Module
    delta: StructuredLinear
    anchor: StructuredLinear | None
    scale: float
    merged: bool
    base_requires_grad: dict[str, bool]

    def __init__(self, base: nn.Module, delta: StructuredLinear, scale: float = 1.0, *,
                 anchor: StructuredLinear | None = None, freeze_base: bool = True) -> None:
        super().__init__()
        in_f, out_f = linear_shape(base)
        if (delta.in_features, delta.out_features) != (in_f, out_f):
            raise ValueError(f"StructuredAdapter: delta is {delta.in_features}->{delta.out_features} but the "
                             f"base layer is {in_f}->{out_f}")
        if delta.bias is not None:
            raise ValueError("StructuredAdapter: the delta must have no bias (the base layer keeps its own); "
                             "build it with bias=False")
        self.base = base
        self.delta = delta
        self.anchor = anchor
        if anchor is not None:
            if (anchor.name, anchor.hparams()) != (delta.name, delta.hparams()):
                raise ValueError("StructuredAdapter: the anchor must have the delta's structure and "
                                 "hyperparameters")
            for p in anchor.parameters():
                p.requires_grad_(False)
        self.scale = check_scale("StructuredAdapter", scale)
        self.merged = False
        #: ``requires_grad`` of each base parameter before adapting: merged layers get it back
        self.base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        if freeze_base:
            for p in self.base.parameters():
                p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.delta.in_features

    @property
    def out_features(self) -> int:
        return self.delta.out_features

    @property
    def transposed(self) -> bool:
        """The base is a Hugging Face ``Conv1D`` (weight stored ``(in, out)``)."""
        return is_conv1d(self.base)

    def delta_weight(self) -> Tensor:
        """``scale * delta`` as a dense ``(out, in)`` matrix (learned part only, minus the anchor)."""
        d = learned_dense(self.delta)
        if self.anchor is not None:
            d = d - learned_dense(self.anchor)
        return self.scale * d

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        xd = x.to(self.delta.weight_dtype) if x.dtype != self.delta.weight_dtype \
            and self.delta.weight_dtype.is_floating_point else x
        d = self.delta(xd)
        if self.anchor is not None:
            d = d - self.anchor(xd)  # fixed residuals cancel
        elif self.delta.has_fixed_residual:
            d = d - self.delta.fixed_residual(xd)
        return y + (self.scale * d).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight (idempotent)."""
        if self.merged:
            return
        weight = _weight(self.base)
        d = self.delta_weight().to(weight.dtype)
        weight.add_(d.T if self.transposed else d)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the delta back out of the base weight (idempotent)."""
        if not self.merged:
            return
        weight = _weight(self.base)
        d = self.delta_weight().to(weight.dtype)
        weight.sub_(d.T if self.transposed else d)
        self.merged = False

    def merged_linear(self) -> nn.Module:
        """The base layer with the delta folded in (the adapter is left unmerged): the same module type
        (``nn.Linear`` / ``Conv1D``, weight layout included), each parameter with the ``requires_grad`` it
        had before :func:`adapt` froze it."""
        import copy

        base = copy.deepcopy(self.base)
        if not self.merged:
            with torch.no_grad():
                weight = _weight(base)
                d = self.delta_weight().to(weight.dtype)
                weight.add_(d.T if self.transposed else d)
        for n, p in base.named_parameters():
            p.requires_grad_(bool(self.base_requires_grad.get(n, True)))
        return base

    def extra_repr(self) -> str:
        return f"scale={self.scale}, merged={self.merged}" + (", anchored" if self.anchor is not None else "")


def check_scale(owner: str, scale: Any) -> float:
    """``scale`` as a finite float, or a clear error."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) and not (
            isinstance(scale, Tensor) and scale.numel() == 1 and not scale.is_complex()):
        raise TypeError(f"{owner}: scale={scale!r} must be a real number (the delta's multiplier, e.g. 1.0 or "
                        f"LoRA's alpha / rank)")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: scale={scale!r} is not finite; the adapted model would output "
                         f"{'nan' if math.isnan(value) else 'inf/nan'}. Pass a finite number such as 1.0 (or "
                         f"LoRA's alpha / rank)")
    return value


def _adapters(model: nn.Module) -> list[tuple[str, StructuredAdapter]]:
    return [(n, m) for n, m in structured_modules(model) if isinstance(m, StructuredAdapter)]


def _names_matching(spec: Any, names: list[str]) -> list[str]:
    """The ``names`` a ``target_modules`` / ``exclude_modules`` value selects (no error when none)."""
    if spec is None:
        return []
    if spec == "all-linear":
        return list(names)
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error:
            return []
        return [n for n in names if rx.fullmatch(n)]
    return [n for n in names if any(isinstance(e, str) and _matches_entry(n, e) for e in spec)]


def _check_not_adapted(model: nn.Module, config: StructureConfig) -> None:
    adapted = [n for n, _ in _adapters(model)]
    hit = _names_matching(config.target_modules, adapted)
    excluded = set(_names_matching(config.exclude_modules, adapted))
    hit = [n for n in hit if n not in excluded]
    if hit:
        shown = ", ".join(hit[:8]) + (f" ... ({len(hit) - 8} more)" if len(hit) > 8 else "")
        raise ValueError(f"adapt: {len(hit)} targeted layer(s) are already adapted: {shown}. An adapter cannot "
                         f"wrap another one: fold the existing adapters in first (adapters.merge_and_unload(), "
                         f"or deftly.surgery.merge_and_unload(model)) and adapt again, or target only layers "
                         f"that have no adapter")


def merge(model: nn.Module) -> None:
    """Merge every adapter of ``model``."""
    for _, a in _adapters(model):
        a.merge()


def unmerge(model: nn.Module) -> None:
    """Unmerge every adapter of ``model``."""
    for _, a in _adapters(model):
        a.unmerge()


#: ``model.__dict__`` key of ``{parameter name: requires_grad}`` as they were before the first :func:`adapt`
_FLAGS = "_deftly_requires_grad_before_adapt"


def _restore_flags(model: nn.Module) -> None:
    """Once no adapter is left: every parameter's ``requires_grad`` as before :func:`adapt` froze it."""
    if _adapters(model):
        return
    flags = model.__dict__.pop(_FLAGS, None) or {}
    for n, prm in model.named_parameters():
        if n in flags:
            prm.requires_grad_(flags[n])


def _unload(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        set_module(model, name, cast(StructuredAdapter, model.get_submodule(name)).merged_linear())
    _restore_flags(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter by its base layer with the delta folded in (plain ``nn.Linear``/``Conv1D``);
    every parameter of the model gets back the ``requires_grad`` it had before :func:`adapt`."""
    return _unload(model, [name for name, _ in _adapters(model)])


class Adapters:
    """The adapters :func:`adapt` added to a model: merge them, unmerge them, train their parameters."""

    def __init__(self, model: nn.Module, names: list[str], report: SurgeryReport) -> None:
        self.model = model
        self.names = names
        self.report = report

    def modules(self) -> list[StructuredAdapter]:
        return [cast(StructuredAdapter, self.model.get_submodule(n)) for n in self.names]

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable delta parameters."""
        for a in self.modules():
            yield from a.delta.parameters()

    def merge(self) -> None:
        for a in self.modules():
            a.merge()

    def unmerge(self) -> None:
        for a in self.modules():
            a.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """:func:`merge_and_unload` of these adapters (the model's ``requires_grad`` flags come back once
        no adapter is left in it)."""
        names, self.names = self.names, []
        return _unload(self.model, names)

    def __str__(self) -> str:
        return str(self.report)

    def __repr__(self) -> str:
        return f"Adapters({len(self.names)} layers, {self.report.trainable_params:,} trainable parameters)"


def adapt(model: nn.Module, config: StructureConfig, *, scale: float = 1.0, zero_init: bool = True,
          freeze: bool = True) -> Adapters:
    """Wrap the targeted layers of ``model`` (in place) with frozen-base structured adapters.

    ``config.structure`` is the delta's structure; its size comes from ``config.hparams`` / overrides
    and/or ``config.budget`` (fraction of each dense layer's parameters spent on the delta).
    ``zero_init``: the delta starts at exactly zero (adapted model == base model) — one factor zero, as
    in LoRA, or, for a structure whose parameters cannot be zeroed that way, an anchored delta
    ``delta(x) - anchor(x)``; ``freeze``: every parameter of the model except the deltas is frozen (else
    only the wrapped base layers). Returns an :class:`Adapters` handle.
    """
    scale = check_scale("adapt", scale)
    if isinstance(config, StructureConfig) and isinstance(model, nn.Module):
        _check_not_adapted(model, config)
    plans = match_layers(model, config)
    before = model_params(model)

    def build(i: int, p: Plan) -> tuple[nn.Module, LayerReport]:  # the template's hook
        in_f, out_f = linear_shape(p.module)
        hp = choose_hparams(p.structure, in_f, out_f, p.budget, kind=config.budget_kind, bias=False,
                            fixed=p.fixed, where=f"layer {p.name!r} ({out_f} x {in_f})")[0]
        delta = build_layer(p, hp, config.seed + i, bias=False)
        anchor = None
        if zero_init and not zero_delta_init_(delta):
            import copy

            anchor = copy.deepcopy(delta)  # delta - anchor is zero at init, gradient intact
        adapter = StructuredAdapter(p.module, delta, scale, anchor=anchor, freeze_base=False)
        return adapter, layer_report(p, delta, adds_to_dense=True, method="adapter")

    flags = {n: prm.requires_grad for n, prm in model.named_parameters()}
    rows = replace_layers(model, plans, build, origin=False)  # nothing is swapped until all are built
    model.__dict__.setdefault(_FLAGS, flags)  # merge_and_unload puts them back (the first adapt's)
    if freeze:
        for prm in model.parameters():
            prm.requires_grad_(False)
    for p in plans:
        adapter = cast(StructuredAdapter, model.get_submodule(p.name))
        for prm in adapter.base.parameters():
            prm.requires_grad_(False)
        for prm in adapter.delta.parameters():
            prm.requires_grad_(True)
    trainable = sum(prm.numel() for prm in model.parameters() if prm.requires_grad)
    report = SurgeryReport(rows, before, model_params(model), structure=config.structure,
                           budget=config.budget, budget_kind=config.budget_kind, action="adapt",
                           trainable_params=trainable)
    return Adapters(model, [p.name for p in plans], report)
