"""The budget solver: the hyperparameters of a structure that fit a parameter or FLOP budget."""

from __future__ import annotations


from ..core.base import StructuredLinear
from ..core.registry import get

__all__ = ["choose_hparams", "dense_count"]


def _count(cls: type[StructuredLinear], in_f: int, out_f: int, hp: dict, kind: str, bias: bool) -> int:
    if kind == "flops":
        return cls.flop_count(in_f, out_f, **hp)
    return cls.param_count(in_f, out_f, **hp) + (out_f if bias else 0)


def dense_count(in_f: int, out_f: int, kind: str = "params", bias: bool = True) -> int:
    return 2 * in_f * out_f if kind == "flops" else in_f * out_f + (out_f if bias else 0)


def _admissible(structure: str, in_f: int, out_f: int, limit: float | None, kind: str, bias: bool,
                fixed: dict) -> list[tuple[int, dict]]:
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
        except (TypeError, ValueError):
            continue
        if limit is None or n <= limit:
            out.append((n, hp))
    return out


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
    on every candidate; when they leave nothing to choose they are returned as they are (explicit values
    win over the budget). Raises ``ValueError`` when nothing fits.
    """
    fixed = dict(fixed or {})
    where = where or f"{structure} {in_features}->{out_features}"
    if budget is None:
        return [fixed]
    grid_keys = {k for hp in get(structure).hparam_candidates(in_features, out_features) for k in hp}
    if fixed and grid_keys <= set(fixed):  # nothing left to choose: explicit values win over the budget
        return [fixed]
    limit = budget * dense_count(in_features, out_features, kind, bias)
    cands = _admissible(structure, in_features, out_features, limit, kind, bias, fixed)
    if not cands:
        everything = _admissible(structure, in_features, out_features, None, kind, bias, fixed)
        smallest = min((n for n, _ in everything), default=None)
        need = (f"the smallest candidate has {smallest} {kind} = "
                f"{smallest / dense_count(in_features, out_features, kind, bias):.4f} of dense"
                if smallest is not None else "the structure offers no candidate for these sizes"
                + (f" with {fixed}" if fixed else ""))
        raise ValueError(f"{where}: no {structure} hyperparameters fit budget={budget} ({kind} <= "
                         f"{int(limit)} of {dense_count(in_features, out_features, kind, bias)}); {need}. "
                         f"Raise the budget, choose another structure for this layer (overrides=...), or "
                         f"exclude it (exclude_modules=...)")
    top = max(n for n, _ in cands)
    ties = [hp for n, hp in cands if n == top]
    if shortlist <= 1:
        return ties[:1]
    others = [(n, hp) for n, hp in _maximal(cands) if (1 - slack) * top <= n < top]
    others.sort(key=lambda t: -t[0])
    out = ties[:shortlist]
    rest = shortlist - len(out)
    if rest > 0 and others:
        if len(others) > rest:  # spread the trials over the shortlist
            others = [others[int(i * len(others) / rest)] for i in range(rest)]
        out += [hp for _, hp in others]
    return out
