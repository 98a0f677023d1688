"""Structure-aware μP-style learning rates: ``param_groups(model, lr)`` for any optimizer.

"Compute Better Spent" (Qiu et al., ICML 2024) shows that structured layers train well only when each
factor gets its own learning rate: under Adam, a step moves every entry by about ``lr``, and the layer's
output then moves by about ``lr * fan_in`` of that factor, so a factor with a small fan-in (a 2x2
butterfly twiddle, a 16-wide Monarch block) barely moves at the learning rate tuned for a dense layer.
Their rule scales each factor's learning rate by ``d_in_dense / (d_in_factor * n_factors)``.

deftly applies that rule *without knowing the structure*: for each weight tensor of a layer it measures,
on a fixed random probe, how far one sign-like (Adam-like) step on that tensor moves the layer's output
(the exact directional derivative, ``torch.func.jvp``), and compares it with the same measurement on a
dense layer of the same shape. The multiplier is ``dense_move / (factor_move * n_weight_tensors)`` — for a
dense matrix it is 1, for a ``k``-block block-diagonal matrix ``k``, for Monarch and BTT it reproduces the
fan-in rule above, and it works unchanged for structures added later (butterfly twiddles stacked in one
tensor, banded diagonals, sums such as low-rank + block-diagonal). A layer may override the measurement
with a method ``mup_lr_multipliers() -> {param_name: float}``.

Initialisation: every deftly structure already initialises each factor so that the layer's output variance
matches ``nn.Linear`` (the structure-aware init), so ``param_groups`` leaves weights alone unless asked:
``zero_init_readout=True`` zero-initialises the given readout modules' weights (μP's output-layer rule).
``base_width`` adds the dense μP width rule ``lr * base_width / fan_in`` for hidden layers.
``max_multiplier`` caps every linear-layer multiplier; **the default cap is** :data:`DEFAULT_MAX_MULTIPLIER`
**= 2** (``None``: the measured multipliers uncapped). Measured on a hand-written 2-layer GPT (d = 256,
AdamW at dense's best lr 1e-3, 25% of the linear weights; ``python benchmarks/transformer_ablation.py``,
docs/defaults.md): over 1,500 steps square-block Monarch ended +4.7% val bits/char behind dense with the
uncapped multipliers (3-14x on some factors) and +1.0% with the cap at 2; at 600 steps the cap at 2 was
the best or tied-best of {1, 2, 4, none} for Monarch, low-rank and block-diagonal alike (uncapped: the
worst for all three). The cap keeps the multipliers below 1 (large fan-in factors) untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear

__all__ = ["DEFAULT_MAX_MULTIPLIER", "factor_moves", "lr_multipliers", "param_groups", "set_lr"]

#: the default cap of :func:`param_groups` on every linear-layer multiplier (see the module docstring)
DEFAULT_MAX_MULTIPLIER = 2.0

_CACHE: dict[Any, dict[str, float]] = {}


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer (``nn.Linear``, a structured layer)."""
    return int(cast(int, layer.in_features)), int(cast(int, layer.out_features))


def _weights(layer: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in layer.named_parameters()
            if p.requires_grad and n.split(".")[-1] != "bias" and (p.is_floating_point() or p.is_complex())}


def factor_moves(layer: nn.Module, batch: int = 1, draws: int = 8, seed: int = 0) -> dict[str, float]:
    """RMS change of ``layer``'s output per unit of an Adam-like (sign of gradient) step on each weight
    tensor, averaged over ``draws`` random probes of ``batch`` unit-variance rows; bias excluded."""
    from torch.func import functional_call, jvp

    weights = _weights(layer)
    if not weights:
        return {}
    in_features = _features(layer)[0]
    gen = torch.Generator().manual_seed(seed)
    dtype = next(iter(weights.values())).dtype
    probe = layer if dtype in (torch.float64, torch.complex128) else _clone_as(layer, torch.float64)
    params = {n: p.detach() for n, p in probe.named_parameters()}
    buffers = dict(probe.named_buffers())
    moves = {n: 0.0 for n in weights}

    def f(ps):
        return functional_call(probe, (ps, buffers), (x,))

    for _ in range(draws):
        x = torch.randn(batch, in_features, generator=gen, dtype=torch.float64)
        p_req = {n: p.clone().requires_grad_(n in weights) for n, p in params.items()}
        y = functional_call(probe, (p_req, buffers), (x,))
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad((y * g).real.sum(), [p_req[n] for n in weights], allow_unused=True)
        for name, grad in zip(weights, grads):
            if grad is None:
                continue
            direction = {n: torch.zeros_like(p) for n, p in params.items()}
            direction[name] = torch.sgn(grad)
            dy = jvp(f, (params,), (direction,))[1]  # (output, J direction)
            moves[name] += float(dy.abs().pow(2).mean().sqrt()) / draws
    return moves


def _clone_as(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A double-precision copy (complex128 for complex tensors), so that the probe is exact."""
    import copy

    c = copy.deepcopy(layer)
    for t in [*c.parameters(), *c.buffers()]:
        if t.is_complex():
            t.data = t.data.to(torch.complex128)
        elif t.is_floating_point():
            t.data = t.data.to(dtype)
    return c


def _key(layer: nn.Module) -> Any:
    hp = layer.hparams() if isinstance(layer, StructuredLinear) else {}
    return (type(layer).__qualname__, *_features(layer), tuple(sorted((k, repr(v)) for k, v in hp.items())))


def layer_multipliers(layer: nn.Module, clamp: tuple[float, float] = (1 / 64, 64.0)) -> dict[str, float]:
    """Learning-rate multiplier of each weight tensor of one linear-like layer (dense weight = 1)."""
    hook = getattr(layer, "mup_lr_multipliers", None)
    if callable(hook):
        return {k: float(v) for k, v in hook().items()}
    key = _key(layer)
    if key in _CACHE:
        return dict(_CACHE[key])
    weights = _weights(layer)
    if isinstance(layer, nn.Linear) or (len(weights) == 1 and type(layer).__name__ == "Dense"):
        out = {n: 1.0 for n in weights}
    else:
        ref = nn.Linear(*_features(layer), bias=False)
        dense_move = factor_moves(ref)["weight"]
        moves = factor_moves(layer)
        n = max(len(moves), 1)
        out = {}
        for name, mv in moves.items():
            m = dense_move / (mv * n) if mv > 0 else 1.0
            out[name] = float(min(max(m, clamp[0]), clamp[1]))
    _CACHE[key] = dict(out)
    return out


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (StructuredLinear, nn.Linear))


def _check_cap(max_multiplier: float | None) -> None:
    if max_multiplier is not None and not (isinstance(max_multiplier, (int, float)) and max_multiplier > 0
                                           and math.isfinite(max_multiplier)):
        raise ValueError(f"max_multiplier={max_multiplier!r} must be None or a positive finite number, e.g. 1.0")


def lr_multipliers(model: nn.Module, base_width: int | None = None,
                   exclude: Iterable[nn.Module] = (), max_multiplier: float | None = None) -> dict[str, float]:
    """``{parameter name: multiplier}`` for every parameter of ``model`` (1 for non-linear parameters,
    biases and the ``exclude``d modules such as the input embedding and the readout). ``max_multiplier``
    caps the multiplier of every linear-layer weight (after the ``base_width`` rule)."""
    _check_cap(max_multiplier)
    excluded = {id(m) for m in exclude}
    mult: dict[str, float] = {}
    for mod_name, mod in model.named_modules():
        if not _is_linear(mod) or id(mod) in excluded:
            continue
        width = (base_width / _features(mod)[0]) if base_width else 1.0
        for pname, m in layer_multipliers(mod).items():
            full = f"{mod_name}.{pname}" if mod_name else pname
            mult[full] = m * width if max_multiplier is None else min(m * width, float(max_multiplier))
    return {n: mult.get(n, 1.0) for n, _ in model.named_parameters()}


def param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0, base_width: int | None = None,
                 exclude: Iterable[nn.Module] = (), zero_init_readout: Iterable[nn.Module] = (),
                 no_decay_1d: bool = True, max_multiplier: float | None = DEFAULT_MAX_MULTIPLIER
                 ) -> list[dict[str, Any]]:
    """Optimizer parameter groups with structure-aware per-factor learning rates.

    Args:
        model: any module; its ``StructuredLinear`` and ``nn.Linear`` layers get per-factor multipliers.
        lr: the learning rate you would use for the dense model (e.g. 1e-3 for AdamW).
        weight_decay: applied to weight tensors (not to biases/norm scales when ``no_decay_1d``); scaled
            by ``1 / multiplier`` so the decoupled decay per step ``lr * wd`` stays that of dense.
        base_width: also apply the dense μP width rule ``lr * base_width / fan_in`` to hidden layers.
        exclude: modules whose parameters keep ``lr`` (e.g. an input projection or the readout).
        zero_init_readout: modules whose weights are zeroed now (μP: last layer of each branch/readout).
        max_multiplier: cap on every linear-layer weight's multiplier (default
            :data:`DEFAULT_MAX_MULTIPLIER` = 2, measured best on GPTs; ``None``: no cap beyond the
            measurement's clamp to (1/64, 64)); ``1.0`` keeps the rates that shrink, drops those that grow.

    Returns a list of dicts ``{"params", "lr", "lr_mult", "weight_decay", "names"}`` for
    ``torch.optim.AdamW(param_groups(model, 1e-3))``; :func:`set_lr` rescales them for a schedule.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"param_groups: lr={lr!r} must be a positive finite number, e.g. 1e-3")
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay={weight_decay} must be >= 0")
    for readout in zero_init_readout:
        with torch.no_grad():
            for n, p in readout.named_parameters():
                if n.split(".")[-1] != "bias":
                    p.zero_()
    _check_cap(max_multiplier)
    mults = lr_multipliers(model, base_width, exclude, max_multiplier=max_multiplier)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = mults[name]
        decay = 0.0 if (no_decay_1d and p.ndim <= 1) or name.split(".")[-1] == "bias" else weight_decay
        key = (round(m, 6), decay / m if decay else 0.0)
        g = groups.setdefault(key, {"params": [], "lr": lr * m, "lr_mult": m, "weight_decay": key[1],
                                    "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr * group['lr_mult']`` (1 for groups without one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
