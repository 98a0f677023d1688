"""Automatic dispatch: pick the fastest multiply for each (structure, shape, batch bucket, dtype, mode).

A structure's ``_matmul`` calls :func:`matmul` with its own implementation (``native``). The candidates:

* ``"native"``  — the structure's own code (always available; the only one under functorch transforms);
* ``"kernel"``  — an optimised kernel from :mod:`deftly.kernels` where one exists (block-diagonal,
  Monarch, butterfly); ``"kernel_strided"`` (block-diagonal) and ``"triton"`` (CUDA) only when forced
  or available;
* ``"dense"``   — multiply by the materialised weight, built as the structure's own multiply of the
  identity. With gradients off (or frozen parameters) it is cached per layer and reused while every
  parameter and buffer is the same tensor (weak reference) at the same ``_version`` and data pointer:
  optimizer steps, ``load_state_dict``, in-place edits, ``layer.to(...)`` all invalidate it (edits
  through ``.data`` bypass the version counter: call :func:`clear_cache` after those). With gradients on
  it is rebuilt, differentiably, every call.

``"auto"`` (the default) times the candidates once per key on a random input of the real batch size
(forward under ``no_grad``; forward+backward via ``torch.autograd.grad`` when training, so no ``.grad`` is
touched): a warm-up each, then rounds that time every candidate once in turn, keeping each one's fastest
call (robust to other processes on a shared machine). Candidates whose FLOPs (or, for the dense weight,
its bytes) cannot beat the best time so far are skipped; the structure's default kernel is kept unless
another candidate is at least 10% faster; the winner is cached. Keys: ``(structure, in, out, hparams,
batch bucket (powers of two), dtype, device, mode)``, mode ``"infer"`` or ``"train"``. Only
float32/bfloat16/float16/complex64 are tuned; float64/complex128 (used for checks), ``torch.compile``
(``"kernel"`` through its registered custom op), autocast, functorch transforms and active
``TorchDispatchMode``s (e.g. ``FlopCounterMode``) take the structure's default.

Forcing: ``deftly.kernels.set_backend("dense")`` (all structures) or ``set_backend("kernel", "monarch")``,
the context manager :func:`use_backend`, or per layer ``layer.kernel_backend = "native"`` (an instance
attribute; ``None`` undoes it). A globally forced backend that a structure lacks falls back to its
default; an unknown name is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "AUTO",
    "backends",
    "choose",
    "clear_cache",
    "decisions",
    "dense_weight",
    "get_backend",
    "lookup",
    "matmul",
    "register_backend",
    "set_backend",
    "timings",
    "use_backend",
]

AUTO = "auto"
TUNED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
#: a candidate is skipped when its FLOPs at this rate already take longer than 1.5x the best time
PEAK_FLOPS = 1.0e12


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., Tensor]  # fn(layer, x) -> (batch, out) without bias
    #: relative FLOPs vs the structure's ``flop_count`` (for the prune); None: unknown
    flops: Callable[[Any, int], float] | None = None
    #: works under torch.compile (traceable or a registered custom op)
    compile_ok: bool = True
    #: needs plain tensors (an autograd.Function without functorch rules, the buffer pool)
    plain_only: bool = False
    #: dtypes it supports (None: all)
    dtypes: tuple | None = None
    #: extra availability test on the input (device, installed packages, ...)
    available: Callable[[Tensor], bool] | None = None
    #: a candidate of the automatic choice (False: only when forced)
    auto: bool = True


_BACKENDS: dict[str, dict[str, Backend]] = {}
_DEFAULT: dict[str, str] = {}
_FORCED: dict[str | None, str] = {}
_DECISIONS: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict[str, float]] = {}
_DENSE: weakref.WeakKeyDictionary[Any, tuple] = weakref.WeakKeyDictionary()
_LOCAL = threading.local()


def register_backend(structure: str, name: str, fn: Callable[..., Tensor], *, default: bool = False,
                     **kw: Any) -> None:
    """Add a candidate implementation ``fn(layer, x)`` for ``structure``."""
    _BACKENDS.setdefault(structure, {})[name] = Backend(name, fn, **kw)
    if default:
        _DEFAULT[structure] = name


def backends(structure: str, x: Tensor | None = None) -> list[str]:
    """Backend names registered for ``structure`` (``native`` and ``dense`` always); with an example input
    ``x``, only those usable for it (e.g. ``"triton"`` needs a CUDA tensor)."""
    _load()
    own = [n for n, b in _BACKENDS.get(structure, {}).items()
           if x is None or b.available is None or b.available(x)]
    return ["native", *own, "dense"]


def set_backend(name: str | None, structure: str | None = None) -> None:
    """Force ``name`` (``"auto"``/``None`` to undo) for ``structure`` or, with ``structure=None``, all."""
    if name is None or name == AUTO:
        _FORCED.pop(structure, None)
        return
    _check_name(name, structure)
    _FORCED[structure] = name


def get_backend(structure: str | None = None) -> str:
    return _FORCED.get(structure, _FORCED.get(None, AUTO)) if structure else _FORCED.get(None, AUTO)


@contextlib.contextmanager
def use_backend(name: str, structure: str | None = None):
    """``with use_backend("dense"): ...`` forces a backend inside the block."""
    old = dict(_FORCED)
    set_backend(name, structure)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)


def _check_name(name: str, structure: str | None) -> None:
    _load()
    known = {"native", "dense", AUTO} | {b for bs in _BACKENDS.values() for b in bs}
    if structure is not None:
        known = set(backends(structure)) | {AUTO}
    if name not in known:
        raise ValueError(f"unknown kernel backend {name!r}"
                         + (f" for {structure!r}" if structure else "")
                         + f"; choose one of: {', '.join(sorted(known))}")


def clear_cache() -> None:
    """Forget every dispatch decision, timing and cached dense weight."""
    _DECISIONS.clear()
    _TIMINGS.clear()
    _DENSE.clear()


def decisions() -> dict[tuple, str]:
    """The cached choices ``key -> backend`` (see module doc for the key)."""
    return dict(_DECISIONS)


# ------------------------------------------------------------------------------------------ dense
def _state(layer) -> tuple:
    ts = [*layer.parameters(), *layer.buffers()]
    return tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in ts), ts


def _build_dense(layer, native) -> Tensor:
    """``W (out, in)`` as the structure's own multiply of the identity: ``layer.flops(in)`` FLOPs, which
    beats ``to_dense()`` where that is a product of dense factors (butterfly)."""
    n = layer.in_features
    eye = torch.eye(n, dtype=layer.weight_dtype, device=_device(layer))
    fn = native
    b = _BACKENDS.get(layer.name, {}).get(_DEFAULT.get(layer.name, "native"))
    if b is not None and not torch.compiler.is_compiling():
        def fn(x, b=b):
            return b.fn(layer, x)
    if native is None and b is None:
        return layer.to_dense()
    if not eye.is_complex() and _any_complex(layer):
        eye = eye.to(layer.weight_dtype)
    return fn(eye).transpose(0, 1)


def _device(layer) -> torch.device:
    for t in (*layer.parameters(), *layer.buffers()):
        return t.device
    return torch.device("cpu")


def _any_complex(layer) -> bool:
    return any(p.is_complex() for p in layer.parameters())


def dense_weight(layer, native: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The layer's dense ``(out, in)`` weight; cached while parameters and buffers are unchanged
    (same tensors, same ``_version``) when no gradient is needed, rebuilt differentiably otherwise."""
    need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())
    if need_grad or torch.compiler.is_compiling():
        return _build_dense(layer, native)
    try:
        key, ts = _state(layer)
    except RuntimeError:  # inference tensors carry no version counter: no caching
        with torch.no_grad():
            return _build_dense(layer, native)
    hit = _DENSE.get(layer)
    if hit is not None and hit[0] == key and len(hit[1]) == len(ts) and all(
            r() is t for r, t in zip(hit[1], ts)):
        return hit[2]
    with torch.no_grad():
        w = _build_dense(layer, native).contiguous()
    _DENSE[layer] = (key, [weakref.ref(t) for t in ts], w)
    return w


def _dense_matmul(layer, x: Tensor, native=None) -> Tensor:
    w = dense_weight(layer, native)
    if w.is_complex() and not x.is_complex():
        x = x.to(w.dtype)
    return F.linear(x, w)


# ------------------------------------------------------------------------------------------ choice
def _load() -> None:
    """The built-in kernels register themselves when :mod:`deftly.kernels` is imported (its
    ``__init__`` imports ``_register`` after this module), which any import of this module triggers."""


def _bucket(batch: int) -> int:
    return 1 if batch <= 1 else 1 << (batch - 1).bit_length()


def _plain(x: Tensor) -> bool:
    """A CPU/CUDA tensor with no functorch wrapper, no autocast, no active TorchDispatchMode
    (FlopCounterMode, fake tensors). Other devices (meta: FSDP's deferred init) take the native path."""
    if x.device.type not in ("cpu", "cuda"):
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch.is_autocast_enabled(x.device.type):
        return False
    try:
        return not torch._C._functorch.is_functorch_wrapped_tensor(x)
    except AttributeError:  # pragma: no cover
        return True


def _mode(layer, x: Tensor) -> str:
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return "train"
    return "infer"


def lookup(layer, batch: int, dtype: torch.dtype, mode: str, device: str = "cpu") -> str | None:
    """The cached decision for ``layer`` at this batch size, dtype and mode (``"infer"``/``"train"``),
    or None if it has not been tuned."""
    return _DECISIONS.get((*_static_key(layer), _bucket(batch), dtype, device, mode))


def _candidates(layer, x: Tensor, compiling: bool, plain: bool) -> dict[str, Backend | None]:
    """name -> Backend (None for native/dense) usable now."""
    out: dict[str, Backend | None] = {"native": None}
    for name, b in _BACKENDS.get(layer.name, {}).items():
        if b.dtypes is not None and x.dtype not in b.dtypes:
            continue
        if (compiling and not b.compile_ok) or (not compiling and b.plain_only and not plain):
            continue
        if b.available is not None and not b.available(x):
            continue
        out[name] = b
    out["dense"] = None
    return out


def _run(name: str, b: Backend | None, layer, x: Tensor, native) -> Tensor:
    if name == "native":
        return native(x)
    if name == "dense":
        return _dense_matmul(layer, x, native)
    return b.fn(layer, x)


def _default(layer, cands: dict) -> str:
    d = _DEFAULT.get(layer.name, "native")
    return d if d in cands else "native"


def _static_key(layer) -> tuple:
    """``(structure, in, out, hparams)``, computed once per layer (hyperparameters are fixed)."""
    d = layer.__dict__
    key = d.get("_deftly_dispatch_key")
    if key is None:
        key = (layer.name, layer.in_features, layer.out_features, tuple(sorted(layer.hparams().items())))
        d["_deftly_dispatch_key"] = key
    return key


def choose(layer, x: Tensor, native: Callable[[Tensor], Tensor]) -> str:
    """The backend :func:`matmul` would use for this layer and input (tuning it if needed)."""
    _load()
    own = layer.__dict__.get("kernel_backend") or _FORCED.get(layer.name)  # for this structure
    forced = own or _FORCED.get(None)  # or for every structure
    compiling = torch.compiler.is_compiling()
    plain = (not compiling) and _plain(x)
    if forced and forced != AUTO:
        cands = _candidates(layer, x, compiling, plain)
        if forced not in cands:  # unknown names are errors; known but unusable here: the default
            _check_name(forced, layer.name if own else None)
        return forced if forced in cands else _default(layer, cands)
    if not plain or x.dtype not in TUNED_DTYPES or x.device.type not in ("cpu", "cuda"):
        return _default(layer, _candidates(layer, x, compiling, plain))
    key = (*_static_key(layer), _bucket(x.shape[0]), x.dtype, x.device.type, _mode(layer, x))
    hit = _DECISIONS.get(key)
    if hit is None and key in getattr(_LOCAL, "tuning", ()):  # re-entered while tuning this key
        return _default(layer, _candidates(layer, x, compiling, plain))
    if hit is None:
        cands = {k: b for k, b in _candidates(layer, x, compiling, plain).items() if b is None or b.auto}
        hit = _tune(key, layer, x, native, cands)
        _DECISIONS[key] = hit
        if hit != "dense":
            _DENSE.pop(layer, None)
    return hit


def matmul(layer, x: Tensor, native: Callable[[Tensor], Tensor]) -> Tensor:
    """``(batch, in) -> (batch, out)`` without bias, through the chosen backend."""
    name = choose(layer, x, native)
    if name == "native":
        return native(x)
    if name == "dense":
        return _dense_matmul(layer, x, native)
    return _BACKENDS[layer.name][name].fn(layer, x)


# ------------------------------------------------------------------------------------------ tuning
#: bytes per second no multiply can beat when it has to read its weights (prune bound for dense)
PEAK_BYTES = 2.0e11
#: the default backend is kept unless another one is at least this much faster
MARGIN = 1.1
#: seconds of timed rounds per key (after the warm-ups), and the most/least rounds
TUNE_BUDGET = 0.15
MAX_ROUNDS, MIN_ROUNDS = 9, 3


def _time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(fn: Callable[[], Any], budget: float) -> float:
    """Fastest of a few calls after one warm-up, within roughly ``budget`` seconds (the minimum is the
    statistic least disturbed by other processes on a shared machine)."""
    _time_once(fn)  # warm-up (also fills caches)
    times = [_time_once(fn)]
    for _ in range(int(min(MAX_ROUNDS, budget / max(times[0], 1e-7))) - 1):
        times.append(_time_once(fn))
    return min(times)


def _lower_bound(name: str, b: Backend | None, layer, x: Tensor, train: bool) -> float:
    """Seconds the backend needs at least: its FLOPs at :data:`PEAK_FLOPS` (x8 for 16-bit types) and,
    for the dense weight, reading it at :data:`PEAK_BYTES`."""
    batch = x.shape[0]
    mem = 0.0
    if name == "dense":
        f = 2.0 * layer.in_features * layer.out_features * batch
        if train:  # the dense weight is rebuilt (and differentiated) every step
            f += float(layer.flops(layer.in_features))
        mem = layer.in_features * layer.out_features * x.element_size() / PEAK_BYTES
    elif b is not None and b.flops is not None:
        f = b.flops(layer, batch)
    else:
        f = float(layer.flops(batch))
    peak = PEAK_FLOPS * (8.0 if x.dtype in (torch.bfloat16, torch.float16) else 1.0)
    return max(f * (3.0 if train else 1.0) / peak, mem)


def _tune(key: tuple, layer, x: Tensor, native, cands: dict[str, Backend | None]) -> str:
    """Time the candidates on a random input of the real shape, interleaved round by round (so a burst
    of load from other processes hits them alike), keeping each one's fastest call."""
    train = key[-1] == "train"
    default = _default(layer, cands)
    # keys being tuned on this thread: a composite structure (lrbd) tunes its parts inside its own
    # warm-up calls, so that its candidates are timed with their parts' best backends
    tuning = getattr(_LOCAL, "tuning", None)
    if tuning is None:
        tuning = _LOCAL.tuning = set()
    tuning.add(key)
    times: dict[str, list[float]] = {}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            xr = torch.randn(x.shape, dtype=x.dtype, device=x.device)
            if train:
                xr.requires_grad_(x.requires_grad)
            params = [p for p in layer.parameters() if p.requires_grad]
            inputs = ([xr] if xr.requires_grad else []) + params
            steps = {}
            for name, b in cands.items():
                if train and inputs:
                    def step(name=name, b=b):
                        y = _run(name, b, layer, xr, native)
                        torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
                else:
                    def step(name=name, b=b):
                        with torch.no_grad():
                            _run(name, b, layer, xr, native)
                steps[name] = step
            best = math.inf
            for name in sorted(cands, key=lambda n: _lower_bound(n, cands[n], layer, x, train)):
                if _lower_bound(name, cands[name], layer, x, train) > 1.5 * best:
                    continue
                try:
                    t = _measure(steps[name], budget=0.0)  # warm-up + one timed call
                except (RuntimeError, NotImplementedError):  # a backend that cannot run here
                    continue
                times[name] = [t]
                best = min(best, t)
            spent, rounds = 0.0, 1
            # at least MIN_ROUNDS unless the calls are long (then one timed call each is all we pay for)
            while times and rounds < MAX_ROUNDS and (spent < TUNE_BUDGET or (
                    rounds < MIN_ROUNDS and spent < 5 * TUNE_BUDGET)):
                best = min(min(v) for v in times.values())
                for name, v in times.items():
                    if min(v) <= 4 * best:
                        t = _time_once(steps[name])
                        v.append(t)
                        spent += t
                rounds += 1
    finally:
        tuning.discard(key)
    results = {k: min(v) for k, v in times.items()}
    _TIMINGS[key] = results
    if not results:
        return default
    winner = min(results, key=results.get)
    if default in results and results[default] <= MARGIN * results[winner]:
        return default
    return winner


def timings() -> dict[tuple, dict[str, float]]:
    """Measured seconds per call of each candidate, per key (what :func:`choose` decided from)."""
    return {k: dict(v) for k, v in _TIMINGS.items()}
