"""Pick a structure's hyperparameters to hit a parameter budget, through the registry only.

``fit_budget(name, in, out, fraction)`` searches integer hyperparameters around each of the structure's
``examples(in, out)`` — one coordinate at a time over 1..max(in, out), then a second pass from the best
point — scoring candidates with the exact classmethod ``param_count`` and keeping the largest count
that does not exceed ``fraction * in * out``; the winner is checked by building the layer on the
``meta`` device. No structure names appear here: new structures work as soon as they register.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import registry

__all__ = ["BudgetError", "fit_budget"]


class BudgetError(ValueError):
    """No hyperparameters of a structure fit the budget."""


def _count(cls, i: int, o: int, hp: dict[str, Any]) -> int | None:
    """Exact count from the classmethod; ``None`` if these hyperparameters are incomplete/invalid."""
    try:
        n = int(cls.param_count(i, o, **hp))
    except Exception:  # noqa: BLE001 - any refusal by a structure means "not this candidate"
        return None
    return n if n > 0 else None


def _complete(name: str, i: int, o: int, hp: dict[str, Any]) -> dict[str, Any] | None:
    """The full hyperparameters (defaults resolved by the constructor) of a possibly partial set."""
    try:
        return dict(registry.make(name, i, o, bias=False, device="meta", **hp).hparams())
    except Exception:  # noqa: BLE001 - any refusal by a structure means "not this candidate"
        return None


def _valid(name: str, i: int, o: int, hp: dict[str, Any]) -> bool:
    try:
        registry.make(name, i, o, bias=False, device="meta", **hp)
        return True
    except Exception:  # noqa: BLE001 - any refusal by a structure means "not this candidate"
        return False


def _int_keys(hp: dict[str, Any]) -> list[str]:
    return [k for k, v in hp.items() if isinstance(v, int) and not isinstance(v, bool)]


def _values(limit: int) -> list[int]:
    vals = set(range(1, min(limit, 256) + 1))
    v = 256
    while v <= limit:  # beyond 256, a geometric grid (x1.06) keeps the search small
        vals.add(v)
        v = int(v * 1.06) + 1
    vals.add(limit)
    return sorted(vals)


def fit_budget(name: str, in_features: int, out_features: int, fraction: float,
               max_candidates: int = 50) -> tuple[dict[str, Any], int]:
    """``(hparams, param_count)`` with the largest ``param_count <= fraction * in * out`` found.

    Raises :class:`BudgetError` (naming the structure and the smallest count seen) when no valid
    hyperparameters fit, e.g. a structure whose cheapest form exceeds the budget.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fit_budget: fraction={fraction} must be in (0, 1], e.g. 0.1 for 10%")
    cls = registry.get(name)
    budget = fraction * in_features * out_features
    limit = max(in_features, out_features)
    scored: dict[tuple, tuple[int, dict[str, Any], int]] = {}  # key -> (count, hparams, moves from an example)

    def consider(hp: dict[str, Any], moves: int) -> None:
        key = tuple(sorted((k, repr(v)) for k, v in hp.items()))
        if key not in scored:
            n = _count(cls, in_features, out_features, hp)
            if n is not None:
                scored[key] = (n, dict(hp), moves)

    bases = []
    for hp in cls.examples(in_features, out_features) or [{}]:
        full = dict(hp) if _count(cls, in_features, out_features, hp) is not None else \
            _complete(name, in_features, out_features, hp)
        if full is not None:
            bases.append(full)
    for b, base in enumerate(bases):  # earlier examples are the structure's preferred shapes
        consider(base, 10 * b)
        for k in _int_keys(base):
            for v in _values(limit):
                consider({**base, k: v}, 10 * b + 1)
    # second pass: coordinate moves from the best few fitting points (pairs such as rank x nblocks)
    fitting = [(n, hp) for n, hp, _ in scored.values() if n <= budget]
    for _, hp in sorted(fitting, key=lambda t: -t[0])[:3]:
        for k in _int_keys(hp):
            for v in _values(limit):
                consider({**hp, k: v}, 10 * len(bases) + 2)
    # the largest count wins, except that a shape closer to a documented example (fewer coordinate moves)
    # (the first example, then one move) is preferred when it reaches 95% of the best count: it avoids lopsided shapes for ~nothing
    fit = [t for t in scored.values() if t[0] <= budget]
    best = max((t[0] for t in fit), default=0)
    ranked = sorted(fit, key=lambda t: (t[0] < 0.95 * best, t[2], -t[0]))
    for n, hp, _ in ranked[:max_candidates]:
        if _valid(name, in_features, out_features, hp):
            return hp, n
    smallest = min((t[0] for t in scored.values()), default=None)
    raise BudgetError(f"structure {name!r} has no hyperparameters with at most {int(budget)} parameters "
                      f"({fraction:.1%} of {in_features}x{out_features}); the smallest found has {smallest}. "
                      "Raise the budget fraction or skip this structure.")


def meta_layer(name: str, in_features: int, out_features: int, **hp: Any) -> torch.nn.Module:
    return registry.make(name, in_features, out_features, device="meta", **hp)
