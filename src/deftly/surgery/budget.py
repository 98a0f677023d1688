"""The budget solver: the hyperparameters of a structure that fit a parameter or FLOP budget."""

from __future__ import annotations

import math

from ..core.base import StructuredLinear
from ..core.registry import get

__all__ = ["FILL", "BudgetError", "choose_hparams", "dense_count"]

#: candidates filling at least this fraction of the fullest candidate's count compete on shape
#: (``shape_score``): a practitioner's shape (divisors, square blocks, the published parametrisation)
#: is worth the last few percent of a budget (docs/defaults.md)
FILL = 0.9


class BudgetError(ValueError):
    """No hyperparameters of a structure fit the budget for a layer."""


def _count(cls: type[StructuredLinear], in_f: int, out_f: int, hp: dict, kind: str, bias: bool) -> int:
    if kind == "flops":
        return cls.flop_count(in_f, out_f, **hp)
    return cls.param_count(in_f, out_f, **hp) + (out_f if bias else 0)


def dense_count(in_f: int, out_f: int, kind: str = "params", bias: bool = True) -> int:
    return 2 * in_f * out_f if kind == "flops" else in_f * out_f + (out_f if bias else 0)


def _admissible(structure: str, in_f: int, out_f: int, limit: float | None, kind: str, bias: bool,
                fixed: dict, errors: list | None = None) -> list[tuple[int, dict]]:
    cls = get(structure)
    seen, out = set(), []
    for cand in cls.hparam_candidates(in_f, out_f):
        hp = {**cand, **fixed}  # fixed values win (even ones the grid does not list)
        key = repr(sorted(hp.items()))
        if key in seen:
            continue
        seen.add(key)
        try:
            n = _count(cls, in_f, out_f, hp, kind, bias)
        except (ArithmeticError, TypeError, ValueError) as err:
            if errors is not None:
                errors.append(err)
            continue
        if limit is None or n <= limit:
            out.append((n, hp))
    return out


def _construct_error(structure: str, in_f: int, out_f: int, hp: dict, bias: bool) -> Exception | None:
    """The error building this layer would raise (built on the meta device: no memory), or ``None``."""
    from ..core.registry import make

    try:
        make(structure, in_f, out_f, bias, device="meta", **hp)
    except (TypeError, ValueError) as err:
        return err
    return None


def _fixed_invalid(structure: str, where: str, fixed: dict, err: Exception) -> Exception:
    kind = type(err) if isinstance(err, (TypeError, ValueError)) else ValueError  # e.g. nblocks=0 divides by 0
    return kind(f"{where}: the fixed hyperparameters {fixed} do not fit this layer: {err}")


def _valid_first(structure: str, in_f: int, out_f: int, cands: list[tuple[int, dict]],
                 bias: bool) -> list[tuple[int, dict]]:
    """Drop the invalid candidates from the largest count down until the first valid one; the rest stay
    unchecked (only the top few are returned, and those are checked again at the end)."""
    order = sorted(range(len(cands)), key=lambda i: -cands[i][0])
    bad = set()
    for i in order:
        if _construct_error(structure, in_f, out_f, cands[i][1], bias) is None:
            break
        bad.add(i)
    return [c for i, c in enumerate(cands) if i not in bad]


def _maximal(cands: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Candidates that no change of a single hyperparameter can grow within the budget."""
    keys = sorted({k for _, hp in cands for k in hp})
    best: dict[tuple, int] = {}
    for n, hp in cands:
        for k in keys:
            g = (k, repr(sorted((a, b) for a, b in hp.items() if a != k)))
            best[g] = max(best.get(g, -1), n)
    out = []
    for n, hp in cands:
        if all(n >= best[(k, repr(sorted((a, b) for a, b in hp.items() if a != k)))] for k in keys):
            out.append((n, hp))
    return out


def choose_hparams(structure: str, in_features: int, out_features: int, budget: float | None, *,
                   kind: str = "params", bias: bool = True, fixed: dict | None = None,
                   shortlist: int = 1, slack: float = 0.0, where: str = "") -> list[dict]:
    """Hyperparameters for one layer under a budget, best first.

    ``budget``: fraction of the dense layer's count (``kind="params"``: weight + bias; ``"flops"``: FLOPs
    per row). Returns the candidate with the largest count within the budget (ties: the structure's
    candidate order), followed, when ``shortlist > 1``, by the other candidates of that count and then
    up to ``shortlist`` maximal candidates within ``slack`` of it. ``fixed`` hyperparameters are imposed
    on every candidate (candidates they make invalid are skipped). Raises ``ValueError`` when nothing
    fits: when the fixed values are themselves invalid for the layer, the error says so (it is not a
    budget problem); when they leave nothing to choose and exceed the budget, the error names the
    count and the budget — use ``budget=None`` (for that layer: ``overrides={name: {"budget": None}}``)
    to build explicit hyperparameters as they are, whatever their size.
    """
    fixed = dict(fixed or {})
    where = where or f"{structure} {in_features}->{out_features}"
    if budget is None:
        return [fixed]
    counted_bias = False if kind == "params" else bias  # the budget is on the weight: biases stay dense
    dense = dense_count(in_features, out_features, kind, counted_bias)
    limit = budget * dense
    grid_keys = {k for hp in get(structure).hparam_candidates(in_features, out_features) for k in hp}
    if fixed and grid_keys <= set(fixed):  # nothing left to choose: the fixed values must fit the budget
        problem = _construct_error(structure, in_features, out_features, fixed, bias)
        if problem is not None:
            raise _fixed_invalid(structure, where, fixed, problem)
        try:
            n = _count(get(structure), in_features, out_features, fixed, kind, counted_bias)
        except (ArithmeticError, TypeError, ValueError) as err:
            raise _fixed_invalid(structure, where, fixed, err) from None
        if n > limit:
            raise ValueError(f"{where}: the fixed {structure} hyperparameters {fixed} give {n:,} {kind} = "
                             f"{n / dense:.3g} of dense ({dense:,}), over budget={budget} (<= {int(limit):,}); "
                             f"drop or lower them so the budget can choose, raise the budget, or build them as they "
                             f"are with budget=None (for one layer: overrides={{name: {{'budget': None}}}})")
        return [fixed]
    errors: list = []
    cands = _admissible(structure, in_features, out_features, limit, kind, counted_bias, fixed, errors)
    if fixed:  # a fixed value may make candidates invalid: the largest valid one must lead
        cands = _valid_first(structure, in_features, out_features, cands, bias)
    if not cands:
        everything = _admissible(structure, in_features, out_features, None, kind, counted_bias, fixed)
        smallest = min((n for n, _ in everything), default=None)
        if fixed:  # is it the budget, or are the fixed values invalid for this layer whatever the budget?
            if not everything and errors:
                raise _fixed_invalid(structure, where, fixed, errors[0])
            first_err, smallest = None, None
            for n, hp in sorted(everything, key=lambda t: t[0])[:256]:
                problem = _construct_error(structure, in_features, out_features, hp, bias)
                if problem is None:
                    smallest = n
                    break
                first_err = first_err or problem
            if smallest is None and first_err is not None:
                raise _fixed_invalid(structure, where, fixed, first_err)
        need = (f"the smallest candidate has {smallest} {kind} = "
                f"{smallest / dense_count(in_features, out_features, kind, counted_bias):.4f} of dense"
                if smallest is not None else "the structure offers no candidate for these sizes") \
            + (f" with {fixed} fixed" if fixed else "")
        raise BudgetError(f"{where}: no {structure} hyperparameters fit budget={budget} ({kind} <= "
                         f"{int(limit)} of {dense_count(in_features, out_features, kind, counted_bias)}); {need}. "
                         f"Raise the budget, choose another structure for this layer (overrides=...), or "
                         f"exclude it (exclude_modules=...)")
    fullest = max(n for n, _ in cands)
    near = [(n, hp) for n, hp in cands if n >= FILL * fullest]
    cls = get(structure)

    def rank_key(n: int, hp: dict) -> tuple[float, int]:
        try:
            score = float(cls.shape_score(in_features, out_features, **hp))
        except (ArithmeticError, TypeError, ValueError):  # invalid fixed values: ranked last, refused later
            score = math.inf
        return round(score, 9), -n

    best = min(rank_key(n, hp) for n, hp in near)
    ties = [hp for n, hp in near if rank_key(n, hp) == best]  # in the structure's candidate order
    top = -best[1]
    if fixed:  # only the fullest candidate was checked (_valid_first): keep the best-ranked valid ones
        ties = [hp for hp in ties if _construct_error(structure, in_features, out_features, hp, bias) is None]
        if not ties:  # the best-ranked are invalid with the fixed values: the next best valid (the fullest is)
            n, hp = next((n, hp) for n, hp in sorted(near, key=lambda t: rank_key(*t))
                          if _construct_error(structure, in_features, out_features, hp, bias) is None)
            ties, top = [hp], n
    if shortlist <= 1:
        return ties[:1]
    others = [(n, hp) for n, hp in _maximal(cands) if (1 - slack) * top <= n < top]
    others.sort(key=lambda t: -t[0])
    out = ties[:shortlist]
    rest = shortlist - len(out)
    if rest > 0 and others:
        if len(others) > rest:  # spread the trials over the shortlist
            others = [others[int(i * len(others) / rest)] for i in range(rest)]
        out += [hp for _, hp in others if not fixed
                or _construct_error(structure, in_features, out_features, hp, bias) is None]
    return out
