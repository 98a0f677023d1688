"""``StructureConfig``: what to structure (names, suffixes, regexes), with which structure, budget, init and
overrides — validated when it is built, with close-match suggestions for misspelt names."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from torch import Tensor

from ..core.registry import get, structures

__all__ = ["StructureConfig"]

_CONFIG_KEYS = ("structure", "budget")


def _describe_candidates(names: list[str], limit: int = 40) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"candidate linear layers: {shown or '(none)'}; their last name parts: {', '.join(suffixes)}"


def _matches_entry(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _match(spec: Any, names: list[str], what: str, *, allow_regex_fallback: bool = True) -> list[str]:
    """Names matched by a regex string or a list of names/suffixes; every pattern must match."""
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression ({err}); use a regex, a "
                             f"list of module names or suffixes, or 'all-linear'") from None
        matched = [n for n in names if rx.fullmatch(n)]
        if not matched:
            inside = [n for n in names if rx.search(n)]
            hint = (f" It occurs inside {len(inside)} name(s) (e.g. {inside[0]!r}) but must match the whole "
                    f"name (re.fullmatch): try {'.*' + spec + '.*'!r}, or pass a list of suffixes."
                    if inside else "")
            raise ValueError(f"{what}={spec!r} matches no linear layer.{hint} {_describe_candidates(names)}")
        return matched
    entries = list(spec)
    hit: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"{what} entries must be module names or suffixes (str), got {entry!r}")
        found = [n for n in names if _matches_entry(n, entry)]
        if not found:
            close = difflib.get_close_matches(entry, names + sorted({n.rsplit('.', 1)[-1] for n in names}),
                                              n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{what} entry {entry!r} matches no linear layer (an entry matches a full name "
                             f"or a suffix after a dot).{hint} {_describe_candidates(names)}")
        hit.extend(f for f in found if f not in hit)
    return [n for n in names if n in hit]


def _override_matches(pattern: str, name: str) -> bool:
    if _matches_entry(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _hparam_names(structure: str) -> set[str] | None:
    """Keyword hyperparameters of a structure's constructor (None: it takes **kwargs)."""
    sig = inspect.signature(get(structure).__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {p for p in sig.parameters if p not in ("self", "in_features", "out_features", "bias", "device",
                                                      "dtype")}


def _check_hparams(structure: str, hp: dict, where: str) -> None:
    valid = _hparam_names(structure)
    if valid is None:
        return
    bad = sorted(set(hp) - valid)
    if bad:
        close = [m for b in bad for m in difflib.get_close_matches(b, sorted(valid), n=1)]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{where}: structure {structure!r} has no hyperparameter {', '.join(map(repr, bad))}; "
                         f"its hyperparameters are: {', '.join(sorted(valid)) or '(none)'}.{hint}")


def _check_budget(budget: Any, where: str) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise TypeError(f"{where}: budget must be a number in (0, 1] (a fraction of the dense layer's "
                        f"parameters or FLOPs), got {budget!r}")
    if not 0 < budget <= 1:
        raise ValueError(f"{where}: budget={budget} is out of range; use a fraction in (0, 1], e.g. 0.25 "
                         f"keeps a quarter of each targeted layer's parameters")
    return float(budget)


_T = TypeVar("_T")


def _suggest_field_names(cls: type[_T]) -> type[_T]:
    """Wrap a dataclass's generated ``__init__`` so that an unknown keyword (``budjet=0.5``) raises a
    ``TypeError`` naming it, the closest field (``Did you mean 'budget'?``) and every field. The dataclass is
    unchanged otherwise: ``dataclasses.fields``/``replace``/``asdict`` and ``inspect.signature`` work as before."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bad = [k for k in kwargs if k not in names]
        if bad:
            close = [c for b in bad for c in difflib.get_close_matches(b, names, n=1)]
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument{'s' if len(bad) > 1 else ''} "
                            f"{', '.join(map(repr, bad))}.{hint} Its fields are: {', '.join(names)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


@_suggest_field_names
@dataclass
class StructureConfig:
    """What :func:`structurize` (and :func:`deftly.adapt`) do to a model. Validated on construction.

    Args:
        structure: a registered structure name (``deftly.structures()``).
        target_modules: regex on the full module name (``re.fullmatch``), a list of names/suffixes, or
            ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output head).
        exclude_modules: same forms; excluded layers are never replaced.
        budget: fraction in (0, 1] of each targeted layer's dense weight entries (biases stay dense and are
            not counted) or, with
            ``budget_kind="flops"``, FLOPs per token. ``None``: use ``hparams`` / the structure defaults.
        budget_kind: ``"params"``, ``"flops"`` or ``"latency"`` (``budget`` = the fraction of the dense
            layer's time on this machine; ``structure`` may then be a list of candidate structures and
            ``latency`` a :class:`deftly.surgery.latency.Latency` with the rows/dtype/mode to time;
            see :mod:`deftly.surgery.latency`).
        hparams: hyperparameters for every targeted layer of ``structure`` (partial ones are fixed and
            the rest is chosen by the budget).
        init: ``"project"`` (best approximation of the pretrained weight) or ``"random"``.
        overrides: ``{pattern: {"structure"?, "budget"?, **hparams}}`` for the targeted layers a pattern
            matches (name, suffix or regex); later patterns win.
        calibration: inputs to run the model on for activation-aware projection: a callable
            ``f(model)``, a dict of keyword inputs, a tensor, or a list of those (one per batch).
        select: ``"params"`` (largest count within budget; equal counts are ranked by projection error)
            or ``"error"`` (smallest projection error among up to ``max_trials`` maximal candidates within
            ``slack`` of the largest count; the closed-form errors rank them, then the winner is refined).
        steps: L-BFGS iterations for fitting / refinement (``None``: deftly's defaults; 0: closed forms
            only, the fastest).
        seed: seed of ``init="random"`` and of fitting inits.
    """

    structure: str
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    budget: float | None = None
    budget_kind: str = "params"
    hparams: dict[str, Any] = field(default_factory=dict)
    init: str = "project"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: Any = field(default=None, repr=False)
    select: str = "params"
    max_trials: int = 6
    slack: float = 0.02
    steps: int | None = None
    seed: int = 0
    latency: Any = None
    #: budget_kind="latency": the structures tried for every layer (set from a list ``structure``; a field,
    #: so that ``dataclasses.replace`` keeps it)
    candidates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # budget_kind="latency": ``structure`` may list the candidate structures tried for every layer
        self.candidates = tuple(self.candidates)
        if self.budget_kind == "latency" and isinstance(self.structure, (list, tuple)):
            if not self.structure or not all(isinstance(x, str) for x in self.structure):
                raise TypeError(f"StructureConfig: structure={self.structure!r} must be a structure name or, "
                                f"with budget_kind='latency', a non-empty list of names")
            for name in self.structure:
                get(name)
            self.candidates = tuple(self.structure)
            self.structure = self.candidates[0]
        if not isinstance(self.structure, str):
            raise TypeError(f"StructureConfig: structure must be a structure name (str), got {self.structure!r}; "
                            f"choose one of: {', '.join(structures())}")
        get(self.structure)  # unknown names raise, listing the choices
        for fname in ("target_modules", "exclude_modules"):
            spec = getattr(self, fname)
            if spec is None and fname == "exclude_modules":
                continue
            if isinstance(spec, str):
                if not spec:
                    raise ValueError(f"StructureConfig: {fname} is empty; pass a regex, a list of names, or "
                                     f"'all-linear'")
                continue
            if isinstance(spec, (list, tuple, set, frozenset)) and spec and all(isinstance(s, str) and s
                                                                                 for s in spec):
                setattr(self, fname, list(spec))
                continue
            raise TypeError(f"StructureConfig: {fname}={spec!r} must be a regex string, 'all-linear' or a "
                            f"non-empty list of module names/suffixes")
        self.budget = _check_budget(self.budget, "StructureConfig")
        if self.budget_kind not in ("params", "flops", "latency"):
            raise ValueError(f"StructureConfig: budget_kind={self.budget_kind!r} is invalid; use 'params', "
                             f"'flops' or 'latency' (budget = the fraction of the dense layer's time on this "
                             f"machine, measured)")
        if self.budget_kind == "latency":
            from .latency import Latency

            if self.budget is None:
                raise ValueError("StructureConfig: budget_kind='latency' needs a budget: the fraction of the dense "
                                 "layer's time, e.g. budget=0.5 for layers at least 2x faster")
            if self.latency is None:
                self.latency = Latency()
            elif not isinstance(self.latency, Latency):
                raise TypeError(f"StructureConfig: latency must be a deftly.surgery.latency.Latency, got "
                                f"{type(self.latency).__name__}")
            if not self.candidates:
                self.candidates = (self.structure,)
            if self.hparams or self.overrides:
                raise ValueError("StructureConfig: budget_kind='latency' chooses structure and hyperparameters "
                                 "per layer from measured timings; drop hparams/overrides (or use "
                                 "budget_kind='params')")
        if not isinstance(self.hparams, dict):
            raise TypeError(f"StructureConfig: hparams must be a dict, got {type(self.hparams).__name__}")
        _check_hparams(self.structure, self.hparams, "StructureConfig.hparams")
        if self.init not in ("project", "random"):
            raise ValueError(f"StructureConfig: init={self.init!r} is invalid; use 'project' (approximate the "
                             f"pretrained weights) or 'random' (the structure's own init)")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"StructureConfig: overrides must be a dict {{pattern: {{...}}}}, got "
                            f"{type(self.overrides).__name__}")
        for pat, ov in self.overrides.items():
            where = f"StructureConfig.overrides[{pat!r}]"
            if not isinstance(pat, str) or not pat:
                raise TypeError(f"StructureConfig: override keys must be non-empty name/suffix/regex strings, "
                                f"got {pat!r}")
            if not isinstance(ov, dict):
                raise TypeError(f"{where} must be a dict of 'structure', 'budget' and hyperparameters, got "
                                f"{ov!r}")
            st = ov.get("structure", self.structure)
            if not isinstance(st, str):
                raise TypeError(f"{where}: structure must be a name, got {st!r}")
            get(st)
            _check_budget(ov.get("budget"), where)
            _check_hparams(st, {k: v for k, v in ov.items() if k not in _CONFIG_KEYS}, where)
        if self.select not in ("params", "error"):
            raise ValueError(f"StructureConfig: select={self.select!r} is invalid; use 'params' (largest count "
                             f"within the budget) or 'error' (smallest projection error near the budget)")
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) or self.max_trials < 1:
            raise ValueError(f"StructureConfig: max_trials={self.max_trials!r} must be an int >= 1")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 0):
            raise ValueError(f"StructureConfig: steps={self.steps!r} must be None or an int >= 0")
        if not isinstance(self.slack, (int, float)) or not 0 <= self.slack < 1:
            raise ValueError(f"StructureConfig: slack={self.slack!r} must be a fraction in [0, 1)")
        cal = self.calibration
        if cal is not None and not (callable(cal) or isinstance(cal, (Tensor, dict, list, tuple))):
            raise TypeError(f"StructureConfig: calibration must be a callable f(model), a dict of model "
                            f"inputs, a tensor or a list of those, got {type(cal).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (without the calibration data)."""
        d = asdict(self)
        d.pop("calibration")
        d["calibrated"] = self.calibration is not None
        d["candidates"] = list(self.candidates)
        if self.budget_kind == "latency":  # the structure as given (every candidate); the dtype as its name
            d["structure"] = list(self.candidates)
            d["latency"]["dtype"] = str(self.latency.dtype)
        return d
