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
  parameters (bias included; or its FLOPs per token with ``budget_kind="flops"``), so the targeted total
  meets it too. deftly walks the structure's :meth:`~deftly.StructuredLinear.hparam_candidates` and takes
  the largest count within the budget (``select="params"``), or, with ``select="error"``, projects the
  best few candidates near the budget and keeps the one with the smallest projection error.
* **Init.** ``"project"`` (default): the best structured approximation of each pretrained weight
  (:mod:`deftly.projection`), activation-aware when ``calibration`` inputs are given; ``"random"``: the
  structure's own init (training from scratch in the same architecture).
* **Overrides.** ``overrides={pattern: {...}}`` sets, for the layers a pattern matches, another
  ``structure``, ``budget`` or hyperparameters (partial hyperparameters fix those and leave the rest to
  the budget).
* **Atomic.** Everything is planned, checked, built and projected before the first module is swapped:
  an error leaves the model unchanged.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import StructuredLinear
from .registry import get, make, structures

__all__ = [
    "LayerReport",
    "StructureConfig",
    "SurgeryReport",
    "choose_hparams",
    "dense_weight",
    "is_linear_like",
    "linear_modules",
    "structurize",
]

_CONFIG_KEYS = ("structure", "budget")


# ---------------------------------------------------------------------------------------------- modules
def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with ``weight: (in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), Tensor) and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def dense_weight(module: nn.Module) -> Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or ``Conv1D`` (transposed view for the latter)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)``."""
    w = dense_weight(module)
    return w.shape[1], w.shape[0]


def _is_wrapper(module: nn.Module) -> bool:
    from .adapters import StructuredAdapter

    return isinstance(module, (StructuredLinear, StructuredAdapter))


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear-like module that surgery may replace, in registration order
    (modules inside structured layers or adapters are skipped)."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if _is_wrapper(mod):
            skip.append(name)
            continue
        if name and is_linear_like(mod):
            out.append((name, mod))
    return out


def structured_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every top-level structured layer or adapter (not their inner parts)."""
    out: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(name.startswith(n + ".") for n, _ in out):
            continue
        if name and _is_wrapper(mod):
            out.append((name, mod))
    return out


def _output_head(model: nn.Module, names: list[str]) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):  # Hugging Face: the LM head, or None (e.g. BertModel has no head)
        try:
            head = getter()
        except (NotImplementedError, AttributeError):  # pragma: no cover - models without one
            head = None
        if head is None:
            return None
        for name, mod in model.named_modules():
            if mod is head:
                return name
        return None
    return names[-1] if names else None


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` by ``new``; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


# ---------------------------------------------------------------------------------------------- patterns
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
        hit = [n for n in names if rx.fullmatch(n)]
        if not hit:
            inside = [n for n in names if rx.search(n)]
            hint = (f" It occurs inside {len(inside)} name(s) (e.g. {inside[0]!r}) but must match the whole "
                    f"name (re.fullmatch): try {'.*' + spec + '.*'!r}, or pass a list of suffixes."
                    if inside else "")
            raise ValueError(f"{what}={spec!r} matches no linear layer.{hint} {_describe_candidates(names)}")
        return hit
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


# ---------------------------------------------------------------------------------------------- config
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
        raise ValueError(f"{where}: structure {structure!r} has no hyperparameter {', '.join(map(repr, bad))}; "
                         f"its hyperparameters are: {', '.join(sorted(valid)) or '(none)'}")


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


@dataclass
class StructureConfig:
    """What :func:`structurize` (and :func:`deftly.adapt`) do to a model. Validated on construction.

    Args:
        structure: a registered structure name (``deftly.structures()``).
        target_modules: regex on the full module name (``re.fullmatch``), a list of names/suffixes, or
            ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output head).
        exclude_modules: same forms; excluded layers are never replaced.
        budget: fraction in (0, 1] of each targeted layer's dense parameters (bias included) or, with
            ``budget_kind="flops"``, FLOPs per token. ``None``: use ``hparams`` / the structure defaults.
        budget_kind: ``"params"`` or ``"flops"``.
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

    def __post_init__(self) -> None:
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
        if self.budget_kind not in ("params", "flops"):
            raise ValueError(f"StructureConfig: budget_kind={self.budget_kind!r} is invalid; use 'params' or "
                             f"'flops'")
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
        return d


# ---------------------------------------------------------------------------------------------- budgets
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


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One replaced layer. Counts include the bias; FLOPs are per input row (token)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    structure: str
    hparams: dict[str, Any]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    error: float | None = None
    output_error: float | None = None
    plain_output_error: float | None = None
    method: str = ""
    seconds: float = 0.0


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_hp(hp: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class SurgeryReport:
    """What :func:`structurize` (or :func:`deftly.adapt`) did: per layer and totals.

    ``str(report)`` is a plain-text table, :meth:`to_markdown` a Markdown one, :meth:`to_dict` JSON-able.
    """

    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    structure: str = ""
    budget: float | None = None
    budget_kind: str = "params"
    action: str = "structurize"
    trainable_params: int | None = None

    # ---- totals
    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.layers)

    @property
    def mean_error(self) -> float | None:
        return _mean(r.error for r in self.layers)

    @property
    def mean_output_error(self) -> float | None:
        return _mean(r.output_error for r in self.layers)

    @property
    def mean_plain_output_error(self) -> float | None:
        return _mean(r.plain_output_error for r in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no replaced layer named {name!r}; replaced: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "structure": self.structure, "budget": self.budget,
                "budget_kind": self.budget_kind, "layers": [asdict(r) for r in self.layers],
                "totals": {"params_before": self.params_before, "params_after": self.params_after,
                           "flops_before": self.flops_before, "flops_after": self.flops_after,
                           "model_params_before": self.model_params_before,
                           "model_params_after": self.model_params_after, "mean_error": self.mean_error,
                           "mean_output_error": self.mean_output_error,
                           "mean_plain_output_error": self.mean_plain_output_error,
                           "trainable_params": self.trainable_params}}

    def _rows(self) -> tuple[list[str], list[list[str]], list[list[str]]]:
        calibrated = any(r.output_error is not None for r in self.layers)
        projected = any(r.error is not None for r in self.layers)
        head = ["layer", "shape (out x in)", "structure", "hparams", "params before", "params after",
                "FLOPs/token before", "FLOPs/token after", "weight error"]
        if calibrated:
            head += ["output error", "output error (plain proj.)"]
        rows = []
        for r in self.layers:
            row = [r.name + (" [Conv1D]" if r.kind == "Conv1D" else ""), f"{r.out_features} x {r.in_features}",
                   r.structure, _fmt_hp(r.hparams), _fmt_int(r.params_before), _fmt_int(r.params_after),
                   _fmt_int(r.flops_before), _fmt_int(r.flops_after), _fmt_err(r.error)]
            if calibrated:
                row += [_fmt_err(r.output_error), _fmt_err(r.plain_output_error)]
            rows.append(row)

        def ratio(a: int, b: int) -> str:
            return f" ({a / b:.3f}x)" if b else ""

        n = len(head)
        tot = ["TOTAL targeted layers", f"{len(self.layers)} layers", self.structure, "-",
               _fmt_int(self.params_before), _fmt_int(self.params_after) + ratio(self.params_after,
                                                                                   self.params_before),
               _fmt_int(self.flops_before), _fmt_int(self.flops_after) + ratio(self.flops_after,
                                                                              self.flops_before),
               _fmt_err(self.mean_error) + (" (mean)" if self.mean_error is not None else "")]
        if calibrated:
            tot += [_fmt_err(self.mean_output_error) + " (mean)", _fmt_err(self.mean_plain_output_error)
                    + " (mean)"]
        whole = ["TOTAL whole model", "incl. embeddings", "", "", _fmt_int(self.model_params_before),
                 _fmt_int(self.model_params_after) + ratio(self.model_params_after, self.model_params_before),
                 "", "", ""] + ([""] * (n - 9))
        if not projected:  # adapters / random init: no error columns
            keep = len(head) - (3 if calibrated else 1)
            head, rows = head[:keep], [r[:keep] for r in rows]
            tot, whole = tot[:keep], whole[:keep]
        return head, rows, [tot, whole]

    def __str__(self) -> str:
        head, rows, totals = self._rows()
        allrows = [head] + rows + totals
        widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
        numeric = set(range(4, len(head)))

        def line(r: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths))).rstrip()

        sep = "  ".join("-" * w for w in widths)
        title = f"deftly {self.action}: {self.structure}" + (
            f", budget {self.budget} of {self.budget_kind}" if self.budget is not None else "")
        extra = (f"\ntrainable parameters: {self.trainable_params:,}" if self.trainable_params is not None
                 else "")
        return "\n".join([title, line(head), sep] + [line(r) for r in rows] + [sep]
                         + [line(r) for r in totals]) + extra

    def to_markdown(self) -> str:
        head, rows, totals = self._rows()
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in
                                                             range(len(head))) + "|"]
        for r in rows + [[f"**{c}**" if c else c for c in t] for t in totals]:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"SurgeryReport({self.action}, {self.structure}, {len(self.layers)} layers, params "
                f"{self.params_before:,} -> {self.params_after:,}, model {self.model_params_before:,} -> "
                f"{self.model_params_after:,})")


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    name: str
    module: nn.Module
    structure: str
    budget: float | None
    fixed: dict[str, Any]


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def plan(model: nn.Module, config: StructureConfig) -> list[_Plan]:
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
        head = _output_head(model, names)
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
    from .projection import Calibration

    cals: dict[str, Calibration] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        in_f = _shape(mod)[0]
        cals[name] = Calibration(in_features=in_f)

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
    empty = [n for n, c in cals.items() if c.count == 0]
    if empty:
        raise ValueError(f"calibration never reached {len(empty)} targeted layer(s) (e.g. {empty[0]!r}); "
                         f"make the calibration run a forward pass through them")
    return cals


def _build(p: _Plan, hp: dict, seed: int) -> StructuredLinear:
    in_f, out_f = _shape(p.module)
    w = dense_weight(p.module)
    bias = getattr(p.module, "bias", None) is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            layer = make(p.structure, in_f, out_f, bias=bias, device=w.device, dtype=w.dtype, **hp)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {p.name!r} ({out_f} x {in_f}): {err}") from None
    return layer


def structurize(model: nn.Module, config: StructureConfig) -> SurgeryReport:
    """Replace the targeted dense layers of ``model`` by structured ones, in place; return the report.

    See :mod:`deftly.surgery` for the matching, budget and init rules. The model keeps its device,
    dtype and train/eval mode; an error (bad pattern, impossible budget...) leaves it unchanged.
    """
    from .projection import project_layer_

    plans = plan(model, config)
    before_total = _model_params(model)
    kind = config.budget_kind
    shortlist = config.max_trials if config.init == "project" else 1
    slack = config.slack if config.select == "error" else 0.0
    choices: list[list[dict]] = []
    for p in plans:
        in_f, out_f = _shape(p.module)
        bias = getattr(p.module, "bias", None) is not None
        cands = choose_hparams(p.structure, in_f, out_f, p.budget, kind=kind, bias=bias, fixed=p.fixed,
                               shortlist=shortlist, slack=slack, where=f"layer {p.name!r} ({out_f} x {in_f})")
        choices.append(cands)
    cals = (collect_calibration(model, [p.name for p in plans], config.calibration)
            if config.calibration is not None and config.init == "project" else {})
    new_layers: list[StructuredLinear] = []
    reports: list[LayerReport] = []
    for i, (p, cands) in enumerate(zip(plans, choices)):
        in_f, out_f = _shape(p.module)
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
            name=p.name, kind="Conv1D" if _is_conv1d(p.module) else type(p.module).__name__,
            in_features=in_f, out_features=out_f, structure=p.structure, hparams=layer.hparams(),
            params_before=dense_count(in_f, out_f, "params", bias), params_after=layer.num_params(),
            flops_before=dense_count(in_f, out_f, "flops"), flops_after=layer.flops(),
            error=None if res is None else res.weight_error,
            output_error=None if res is None else res.output_error,
            plain_output_error=None if res is None else res.plain_output_error,
            method="random init" if res is None else res.method, seconds=0.0 if res is None else res.seconds))
    for p, layer in zip(plans, new_layers):
        set_module(model, p.name, layer)
    return SurgeryReport(reports, before_total, _model_params(model), structure=config.structure,
                         budget=config.budget, budget_kind=kind)
