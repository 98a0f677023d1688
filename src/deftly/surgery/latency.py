"""Latency budgets: per layer, the structure and hyperparameters that make it at least ``k`` times faster
than the dense layer *on this machine*, measured, at the least approximation error.

``StructureConfig(structure=["monarch", "lowrank", "blockdiag"], budget=0.5, budget_kind="latency")``
asks every targeted layer to run in at most half the dense layer's time. For each layer shape, each
candidate structure is tried at a ladder of parameter budgets (:data:`LADDER`, hyperparameters from the
budget solver); each candidate's forward time is measured against ``nn.Linear`` of the same shape,
interleaved in one process, at ``rows`` rows per call (e.g. batch x tokens). Candidates meeting the target
are ranked by their projection error on the layer's weight (``init="project"``) or, for random init, by
parameter count (most expressive first). Timings are cached per machine and shape in
``$DEFTLY_CACHE/latency.json`` (``~/.cache/deftly``); ``deftly bench --tune`` fills the cache ahead of time
and :func:`clear` (or ``remeasure=True``) measures again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.files import atomic_write_bytes
from ..core.registry import get, make
from .budget import choose_hparams

__all__ = ["LADDER", "Candidate", "Latency", "cache_path", "candidates", "choose", "clear", "layer_speedup", "tune"]

#: parameter budgets (fractions of the dense layer) tried for every structure
LADDER = (0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.33, 0.5, 0.7)
#: structures tried when the config names none
DEFAULT_STRUCTURES = ("lowrank", "monarch", "blockdiag", "lrbd", "btt")


@dataclass(frozen=True)
class Latency:
    """How latency is measured: ``rows`` per call, ``dtype``, ``mode`` (``"infer"``: forward under
    ``inference_mode``; ``"train"``: forward + backward), seconds of interleaved timing per candidate."""

    rows: int = 4096
    dtype: torch.dtype = torch.float32
    mode: str = "infer"
    seconds: float = 0.15
    ladder: tuple[float, ...] = LADDER

    def __post_init__(self) -> None:
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"Latency: rows={self.rows!r} must be an int >= 1 (rows per call: batch x tokens)")
        if self.mode not in ("infer", "train"):
            raise ValueError(f"Latency: mode={self.mode!r} must be 'infer' or 'train'")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"Latency: dtype={self.dtype!r} must be a floating torch.dtype, e.g. torch.float32")
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError(f"Latency: seconds={self.seconds!r} must be a positive number, e.g. 0.15")
        if not self.ladder or not all(0 < b <= 1 for b in self.ladder):
            raise ValueError(f"Latency: ladder={self.ladder!r} must be fractions in (0, 1]")


@dataclass(frozen=True)
class Candidate:
    structure: str
    hparams: dict[str, Any]
    params: int
    seconds: float
    dense_seconds: float

    @property
    def time_fraction(self) -> float:
        """The candidate's time as a fraction of the dense layer's (0.5 = twice as fast)."""
        return self.seconds / self.dense_seconds

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.seconds


# ---------------------------------------------------------------------------------------------- cache
def cache_path() -> Path:
    root = os.environ.get("DEFTLY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deftly")
    return Path(root) / "latency.json"


def _machine() -> str:
    return (f"{platform.machine()}|{platform.processor() or platform.uname().processor}|{os.cpu_count()}cpu|"
            f"torch{torch.__version__}|{torch.get_num_threads()}threads")


def _load() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save(cache: dict[str, Any]) -> None:
    try:
        atomic_write_bytes(cache_path(), json.dumps(cache, indent=0, sort_keys=True).encode())
    except OSError:  # a read-only home must not break surgery: the timings are simply not kept
        pass


def clear() -> None:
    """Forget every cached timing of this machine."""
    cache = _load()
    cache.pop(_machine(), None)
    _save(cache)


def _key(structure: str, in_f: int, out_f: int, hp: dict[str, Any], opts: Latency) -> str:
    return json.dumps([structure, in_f, out_f, sorted(hp.items()), opts.rows, str(opts.dtype), opts.mode],
                      default=str)


# ---------------------------------------------------------------------------------------------- timing
def _callable(layer: nn.Module, x: Tensor, mode: str) -> Callable[[], Any]:
    if mode == "infer":
        def run() -> None:
            with torch.inference_mode():
                layer(x)
    else:
        params = [p for p in layer.parameters() if p.requires_grad]

        def run() -> None:
            y = layer(x)
            torch.autograd.grad(y, params, torch.ones_like(y))
    return run


def _time_pair(fa: Callable[[], Any], fb: Callable[[], Any], seconds: float) -> tuple[float, float]:
    """Fastest call of each, timed alternately (a, b, a, b, ...) after a warm-up of each."""
    for f in (fa, fb, fa, fb):
        f()
    best = [math.inf, math.inf]
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 3 or (time.perf_counter() < t_end and rounds < 50):
        for i, f in enumerate((fa, fb)):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
        rounds += 1
    return best[0], best[1]


def _measure(structure: str, in_f: int, out_f: int, hp: dict[str, Any], opts: Latency) -> tuple[float, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = make(structure, in_f, out_f, dtype=opts.dtype, **hp)
        dense = nn.Linear(in_f, out_f, dtype=opts.dtype)
        x = torch.randn(opts.rows, in_f, dtype=opts.dtype)
    return _time_pair(_callable(layer, x, opts.mode), _callable(dense, x, opts.mode), opts.seconds)


def progress(line: str) -> None:
    """The default progress line of a measurement (stderr, flushed): timing a missing shape takes ~1 s per
    candidate, so a plan or latency budget on a fresh cache shows what it is doing."""
    print(line, file=sys.stderr, flush=True)


def _timing(mine: dict[str, Any], structure: str, in_f: int, out_f: int, hp: dict[str, Any], opts: Latency, *,
            measure: bool = True, remeasure: bool = False,
            log: Callable[[str], None] | None = None) -> tuple[Candidate | None, bool]:
    """``(candidate, measured)``: the timing of one layer from ``mine`` (this machine's part of the cache),
    measured and stored there when it is missing (or ``remeasure``) and ``measure`` allows; ``None`` when
    it is missing and not measured."""
    key = _key(structure, in_f, out_f, hp, opts)
    measured = False
    if remeasure or key not in mine:
        if not measure:
            return None, False
        if log:
            log(f"latency: timing {structure} {hp} at {in_f}x{out_f}, {opts.rows} rows")
        mine[key] = list(_measure(structure, in_f, out_f, hp, opts))
        measured = True
    t, td = mine[key]
    return Candidate(structure, hp, get(structure).param_count(in_f, out_f, **hp), t, td), measured


def candidates(in_features: int, out_features: int, structures: Sequence[str] | None = None,
               opts: Latency | None = None, *, bias: bool = True, remeasure: bool = False,
               log: Callable[[str], None] | None = None) -> list[Candidate]:
    """Every (structure, hyperparameters) of the ladder for this shape, with measured times (cached)."""
    opts = opts or Latency()
    structures = list(structures or DEFAULT_STRUCTURES)
    cache = _load()
    mine = cache.setdefault(_machine(), {})
    out: list[Candidate] = []
    dirty = False
    for s in structures:
        get(s)
        seen = set()
        for frac in opts.ladder:
            try:
                hp = choose_hparams(s, in_features, out_features, frac, bias=bias)[0]
            except ValueError:  # nothing of this structure fits so small a budget
                continue
            key = _key(s, in_features, out_features, hp, opts)
            if key in seen:
                continue
            seen.add(key)
            cand, measured = _timing(mine, s, in_features, out_features, hp, opts, remeasure=remeasure, log=log)
            assert cand is not None  # measure=True: never missing
            out.append(cand)
            dirty |= measured
    if dirty:
        _save(cache)
    return out


def layer_speedup(structure: str, in_features: int, out_features: int, hparams: dict[str, Any] | None = None,
                  opts: Latency | None = None, *, measure: bool = True, remeasure: bool = False,
                  log: Callable[[str], None] | None = None) -> Candidate | None:
    """The timing of one ``structure`` layer with ``hparams`` against ``nn.Linear`` of the same shape on
    this machine (``.speedup`` = dense seconds / structured seconds, ``opts.rows`` rows per call): from the
    cache, or measured on fresh layers and cached when ``measure`` (``None`` when it is not cached and
    ``measure=False``). ``structure="dense"`` with no hyperparameters gives the dense layer's time."""
    opts = opts or Latency()
    get(structure)  # an unknown name fails before anything is timed
    cache = _load()
    cand, measured = _timing(cache.setdefault(_machine(), {}), structure, in_features, out_features,
                             dict(hparams or {}), opts, measure=measure, remeasure=remeasure, log=log)
    if measured:
        _save(cache)
    return cand


def choose(in_features: int, out_features: int, target: float, structures: Sequence[str] | None = None,
           opts: Latency | None = None, *, bias: bool = True,
           error: Callable[[str, dict[str, Any]], float] | None = None, where: str = "",
           log: Callable[[str], None] | None = None) -> Candidate:
    """The candidate whose time is at most ``target`` x the dense layer's, with the smallest ``error``
    (``error(structure, hparams)``, e.g. the projection error of this layer's weight) or, without one,
    the most parameters. Raises ``ValueError`` naming the fastest candidate when none is fast enough."""
    if not (0 < target <= 1):
        raise ValueError(f"{where or 'latency'}: budget={target!r} must be a fraction of the dense layer's "
                         f"time in (0, 1], e.g. 0.5 for 2x faster")
    cands = candidates(in_features, out_features, structures, opts, bias=bias, log=log)
    ok = [c for c in cands if c.time_fraction <= target]
    if not ok:
        fastest = min(cands, key=lambda c: c.time_fraction, default=None)
        got = (f"the fastest candidate, {fastest.structure} {fastest.hparams}, takes "
               f"{fastest.time_fraction:.2f}x the dense time" if fastest else "no candidate could be built")
        raise ValueError(f"{where or f'{out_features}x{in_features}'}: no structure of "
                         f"{list(structures or DEFAULT_STRUCTURES)} reaches {target:.2f}x the dense layer's time on "
                         f"this machine ({got}); raise the budget or add structures")
    if error is None:
        return max(ok, key=lambda c: (c.params, -c.seconds))
    # the best-expressing candidate per structure (most parameters within the target), ranked by error
    per: dict[str, Candidate] = {}
    for c in ok:
        if c.structure not in per or c.params > per[c.structure].params:
            per[c.structure] = c
    return min(per.values(), key=lambda c: error(c.structure, c.hparams))


def tune(shapes: Sequence[tuple[int, int]], structures: Sequence[str] | None = None, opts: Latency | None = None,
         *, remeasure: bool = True, log: Callable[[str], None] | None = print) -> dict[tuple[int, int], list[Candidate]]:
    """Measure (and cache) every candidate for each ``(in, out)`` shape: what ``deftly bench --tune`` runs."""
    return {(i, o): candidates(i, o, structures, opts, remeasure=remeasure, log=log) for i, o in shapes}
