"""Backend dispatch behind :meth:`StructuredLinear.forward`: which multiply runs, decided once per key.

A structure class lists its fast multiplies in a class attribute ``kernels = {name: KernelSpec(...)}``
(the layer module imports them from :mod:`deftly.kernels`); a kernel is a function of tensors and sizes,
``spec.fn(x, *layer._kernel_args(), [bias=...])``, never of the layer. Every structure also has two
backends that need no declaration:

* ``"native"`` — the structure's own ``_matmul`` (the only one for non-plain inputs: functorch
  transforms, autocast, active ``TorchDispatchMode``s such as ``FlopCounterMode``, meta tensors);
* ``"dense"``  — ``F.linear`` with the materialised weight, built as the default multiply of the identity.
  With no gradient needed it is cached on the layer and reused while every parameter is the same tensor
  at the same ``_version`` and data pointer (optimizer steps, ``load_state_dict``, in-place edits and
  ``layer.to(...)`` invalidate it; edits through ``.data`` do not bump the version: call
  ``deftly.kernels.clear_cache()`` after those). With gradients it is rebuilt, differentiably, per call.

**The choice is deterministic by default**: the first kernel whose ``default`` accepts the batch size and
mode (``default=True``, or ``default(batch, train) -> bool``) and that can run the input (``dtypes``,
``available``), else ``"native"``; in inference, a structure whose FLOPs per row exceed the dense
matrix's takes ``"dense"``. Timing is opt-in: inside ``deftly.kernels.tune()`` (or with
``DEFTLY_TUNE=1`` in the environment) a key seen for the first time times its candidates (see
:func:`_tune`) and the fastest is kept (the static choice unless another is :data:`MARGIN` faster);
tuned choices are shared by layers of the same shape and stay in use, tuning on or off, until
``clear_cache()``. Forcing (``set_backend``, ``use_backend``, ``layer.kernel_backend``) wins over both.

Per layer, the facts the forward needs (sizes, dtype, device, the modules holding parameters) and the
chosen multiply per ``(batch bucket, train)`` sit in one cache object (:class:`Facts`) in the layer's
``__dict__``, dropped by ``_apply`` (``.to``, ``.half``, ...), ``load_state_dict``, assigning a tensor or
module attribute, and any change of the global policy (a generation counter); it is never pickled or
copied. Keys of :func:`decisions`: ``(structure, in, out, hparams, batch bucket (powers of two), dtype,
device type, mode)``, mode ``"infer"``/``"train"``.

This module is core-level (it imports nothing from deftly): :mod:`deftly.kernels` re-exports the
public functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["AUTO", "DENSE", "NATIVE", "Facts", "KernelSpec", "choose", "clear_cache", "decisions",
           "dense_weight", "facts", "forced", "matmul", "set_forced", "timings", "tune"]

AUTO, NATIVE, DENSE = "auto", "native", "dense"
#: dtypes that :func:`tune` times (float64/complex128 are for checks: they take the static choice)
TUNED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)
#: a tuning candidate is skipped when its FLOPs at this rate already take longer than 1.5x the best time
PEAK_FLOPS = 1.0e12
#: bytes per second no multiply can beat when it has to read its weights (prune bound for dense)
PEAK_BYTES = 2.0e11
#: the static choice is kept unless another candidate is at least this much faster
MARGIN = 1.1
#: seconds of timed rounds per key (after the warm-ups), and the most/least rounds
TUNE_BUDGET = 0.15
MAX_ROUNDS, MIN_ROUNDS = 9, 3
_CACHE_ATTR = "_deftly_fast"


@dataclass(frozen=True)
class KernelSpec:
    """A fast multiply of one structure: ``fn(x, *layer.<args>()) -> (batch, out)``, or with
    ``bias=True`` ``fn(x, *args, bias=b)`` adding ``b`` itself (fused where the kernel allows)."""

    fn: Callable[..., Tensor]
    #: the static choice: ``True`` (always), ``False`` (only when forced or tuned) or ``(batch, train) -> bool``
    default: bool | Callable[[int, bool], bool] = False
    #: ``fn`` takes ``bias=`` and adds it
    bias: bool = False
    #: the layer method returning the tensors and sizes ``fn`` takes after ``x``
    args: str = "_kernel_args"
    #: FLOPs for ``(layer, batch)`` when not the structure's ``flops`` (the tuner's prune); None: those
    flops: Callable[[Any, int], float] | None = None
    #: traceable by ``torch.compile`` (pure torch ops or a registered custom op)
    compile_ok: bool = True
    #: dtypes it supports (None: all)
    dtypes: tuple[torch.dtype, ...] | None = None
    #: ``available(x) -> bool`` for inputs it can run (e.g. CUDA only); None: every plain input
    available: Callable[[Tensor], bool] | None = None
    #: a candidate when tuning (False: only when forced)
    auto: bool = True
    #: ``(layer, batch, train) -> bool``: the static choice for a given layer (its block sizes, weight size),
    #: used instead of ``default`` where the layer is known (``default`` stays the layer-free summary)
    layer_default: Callable[[Any, int, bool], bool] | None = None

    def is_default(self, batch: int, train: bool, layer: Any = None) -> bool:
        if self.layer_default is not None and layer is not None:
            return bool(self.layer_default(layer, batch, train))
        d = self.default
        return d(batch, train) if callable(d) else bool(d)

    def usable(self, x: Tensor) -> bool:
        return (self.dtypes is None or x.dtype in self.dtypes) and (self.available is None or self.available(x))


class _State:
    gen = 0  # bumped by every policy change: layers re-resolve their cached choices
    tuning = os.environ.get("DEFTLY_TUNE", "") == "1"
    timer: Callable[[str, Callable[[], Any]], float] | None = None
    forced: ClassVar[dict[str | None, str]] = {}


class StructuredModule(Protocol):
    """What dispatch reads from a structure class (:class:`deftly.core.base.StructuredLinear` is one; this
    module sits below it, so it names the shape rather than importing the class)."""

    kernels: ClassVar[dict[str, KernelSpec]]


STATE = _State()
_DECISIONS: dict[tuple, tuple[str, bool]] = {}  # key -> (backend, tuned)
_TIMINGS: dict[tuple, dict[str, float]] = {}
_ROUTES: dict[tuple, Callable] = {}  # (class, KernelSpec) -> route


def _bump() -> None:
    STATE.gen += 1


# ------------------------------------------------------------------------------------------ per layer
class Facts:
    """What the forward needs to know about a layer, computed once (see the module doc)."""

    __slots__ = ("cast_from", "dense", "dense_heavy", "device", "dtype", "gen", "in_features", "names", "owners",
                 "plain_device", "route_sets", "routes", "static_key")

    def __init__(self, layer: Any) -> None:
        self.gen = STATE.gen
        self.in_features = layer.in_features
        self.dtype = layer.weight_dtype
        #: a real input of this dtype is cast to the (complex) weight dtype
        self.cast_from = self.dtype.to_real() if self.dtype.is_complex else None
        first = next(layer.parameters(), None)
        self.device = first.device if first is not None else None
        modules = list(layer.modules())
        # kernels read parameters from ``_parameters``; a parametrization (``torch.nn.utils.parametrize``,
        # e.g. deftly.distributed's complex -> (real, imag) for FSDP2) computes them instead: such a layer
        # takes the structure's own multiply, which reads them as attributes
        parametrized = any("parametrizations" in m._modules for m in modules)
        self.plain_device = self.device is not None and self.device.type in ("cpu", "cuda") and not parametrized
        self.owners = tuple(m for m in modules if m._parameters)
        #: chosen multiply and its name per key, one pair of dicts per value of ``layer.kernel_backend``
        #: (so that toggling it, as benchmarks do, re-decides nothing)
        self.route_sets: dict[str | None, tuple[dict[int, Callable], dict[int, str]]] = {}
        self.routes: dict[int, Callable] = {}
        self.names: dict[int, str] = {}
        self.select(layer.__dict__.get("kernel_backend"))
        self.dense: tuple | None = None
        try:
            self.dense_heavy = layer.flops(1) > 2 * layer.in_features * layer.out_features
        except NotImplementedError:  # a structure without counts: never the dense fallback by rule
            self.dense_heavy = False
        self.static_key = (layer.name, layer.in_features, layer.out_features,
                           tuple(sorted(layer.hparams().items())))

    def select(self, forced_name: str | None) -> None:
        """Switch to the route cache of this per-layer forced backend (None: the global policy)."""
        pair = self.route_sets.get(forced_name)
        if pair is None:
            pair = self.route_sets[forced_name] = ({}, {})
        self.routes, self.names = pair


def facts(layer: Any) -> Facts:
    """The layer's :class:`Facts`, rebuilt when missing or older than the last policy change."""
    f = layer.__dict__.get(_CACHE_ATTR)
    if f is None or f.gen != STATE.gen:
        f = layer.__dict__[_CACHE_ATTR] = Facts(layer)
    return f


def drop_facts(layer: Any) -> None:
    layer.__dict__.pop(_CACHE_ATTR, None)


def params_need_grad(f: Facts) -> bool:
    for m in f.owners:
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                return True
    return False


def plain(x: Tensor) -> bool:
    """No functorch wrapper, no autocast, no active TorchDispatchMode (FlopCounterMode, fake tensors),
    not being traced. (The layer's device is checked through :class:`Facts`.)"""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_any_autocast_enabled() or torch._C._functorch.is_functorch_wrapped_tensor(x))


def key_of(batch: int, train: bool) -> int:
    """``(batch bucket, train)`` as one int: the bucket is ``2 ** (key >> 1)``."""
    return ((batch - 1).bit_length() if batch > 1 else 0) * 2 + train


# ------------------------------------------------------------------------------------------ forcing
def forced(structure: str | None = None) -> str:
    return STATE.forced.get(structure, STATE.forced.get(None, AUTO)) if structure else \
        STATE.forced.get(None, AUTO)


def set_forced(name: str | None, structure: str | None = None) -> None:
    if name is None or name == AUTO:
        STATE.forced.pop(structure, None)
    else:
        STATE.forced[structure] = name
    _bump()


@contextlib.contextmanager
def forcing(name: str, structure: str | None = None):
    old = dict(STATE.forced)
    set_forced(name, structure)
    try:
        yield
    finally:
        STATE.forced.clear()
        STATE.forced.update(old)
        _bump()


def check_layer_backend(layer: Any, name: str) -> None:
    """``ValueError`` naming the choices when ``name`` is no backend of this layer's structure."""
    known = [NATIVE, *type(layer).kernels, DENSE, AUTO]
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        raise ValueError(f"unknown kernel backend {name!r} for {layer.name!r}; choose one of: "
                         f"{', '.join(known)}" + (f". Did you mean {close[0]!r}?" if close else ""))


class tune:  # lower case: used like torch.set_grad_enabled, as a function call or a context manager
    """Time the candidates of every key seen for the first time (opt-in; the default is the static
    choice). ``deftly.kernels.tune()`` switches tuning on (``tune(False)`` off); ``with tune(): ...``
    restores the previous setting on exit. ``timer(backend, call) -> seconds`` replaces the wall-clock
    measurement of one call (for tests). Tuned choices stay in use until ``clear_cache()``."""

    def __init__(self, enabled: bool = True, *, timer: Callable[[str, Callable[[], Any]], float] | None = None
                 ) -> None:
        self._prev = (STATE.tuning, STATE.timer)
        STATE.tuning, STATE.timer = bool(enabled), timer
        _bump()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        STATE.tuning, STATE.timer = self._prev
        _bump()


def clear_cache() -> None:
    """Forget every decision, timing and cached dense weight (every layer re-decides on its next call)."""
    _DECISIONS.clear()
    _TIMINGS.clear()
    _bump()


def decisions() -> dict[tuple, str]:
    """The choices made so far, ``key -> backend`` (see the module doc for the key)."""
    return {k: v[0] for k, v in _DECISIONS.items()}


def timings() -> dict[tuple, dict[str, float]]:
    """Measured seconds per call of each candidate, per tuned key."""
    return {k: dict(v) for k, v in _TIMINGS.items()}


# ------------------------------------------------------------------------------------------ routes
def _native(layer: Any, x: Tensor, bias: Tensor | None) -> Tensor:
    y = layer._matmul(x)
    return y if bias is None else y + bias


def _dense(layer: Any, x: Tensor, bias: Tensor | None) -> Tensor:
    w = dense_weight(layer)
    if x.is_complex() and not w.is_complex():
        # a real-output map of complex parameters (``Re(B x)``): its dense weight ``Re(B)`` holds for
        # real inputs only, so complex ones take the structure's own multiply
        return _native(layer, x, bias)
    if w.is_complex() and not x.is_complex():
        x = x.to(w.dtype)
    if bias is not None and bias.dtype == w.dtype:
        return F.linear(x, w, bias)
    y = F.linear(x, w)
    return y if bias is None else y + bias


def route(cls: type[StructuredModule], name: str) -> Callable[[Any, Tensor, Tensor | None], Tensor]:
    """``run(layer, x, bias) -> y`` for backend ``name`` of structure class ``cls``."""
    if name == NATIVE:
        return _native
    if name == DENSE:
        return _dense
    spec = cls.kernels[name]
    r = _ROUTES.get((cls, spec))
    if r is None:
        fn, args = spec.fn, getattr(cls, spec.args)
        if spec.bias:
            def r(layer, x, bias, fn=fn, args=args):
                return fn(x, *args(layer), bias=bias)
        else:
            def r(layer, x, bias, fn=fn, args=args):
                y = fn(x, *args(layer))
                return y if bias is None else y + bias
        _ROUTES[(cls, spec)] = r
    return r


def static_choice(layer: Any, f: Facts | None, x: Tensor, batch: int, train: bool, compiling: bool = False,
                  dense_ok: bool = True) -> str:
    """The deterministic choice: dense for a structure costlier than dense (inference), else the first
    default kernel that can run ``x``, else native."""
    if dense_ok and not train and not compiling and f is not None and f.dense_heavy and (
            not x.is_complex() or dense_weight(layer).is_complex()):  # see _dense: real-output maps
        return DENSE
    for name, spec in type(layer).kernels.items():
        if (spec.compile_ok or not compiling) and spec.is_default(batch, train, layer) and spec.usable(x):
            return name
    return NATIVE


def _forced_choice(layer: Any, x: Tensor, compiling: bool) -> str | None:
    own = layer.__dict__.get("kernel_backend") or STATE.forced.get(layer.name)
    name = own or STATE.forced.get(None)
    if not name or name == AUTO:
        return None
    if name in (NATIVE, DENSE):
        return name
    spec = type(layer).kernels.get(name)
    if spec is None and own:
        check_layer_backend(layer, name)
    if spec is not None and spec.usable(x) and (spec.compile_ok or not compiling):
        return name
    return ""  # known but unusable here (or absent from this structure): the static choice


def resolve(layer: Any, f: Facts, key: int, x: Tensor) -> Callable:
    """Decide (once per layer and key) and cache ``f.routes[key]``; ``x``: the plain 2-D input."""
    batch, train = x.shape[0], bool(key & 1)
    name = _forced_choice(layer, x, False)
    if name == "":  # forced to a backend this structure or input lacks: the static choice
        name = static_choice(layer, f, x, batch, train)
    elif name is None:
        dkey = (*f.static_key, 1 << (key >> 1), x.dtype, x.device.type, "train" if train else "infer")
        hit = _DECISIONS.get(dkey)
        if hit is not None and hit[1]:
            name = hit[0]
        elif STATE.tuning and x.dtype in TUNED_DTYPES:
            name = _tune(dkey, layer, f, x, train)
            _DECISIONS[dkey] = (name, True)
        else:
            name = static_choice(layer, f, x, batch, train)
            _DECISIONS[dkey] = (name, False)
    r = f.routes[key] = route(type(layer), name)
    f.names[key] = name
    return r


def traced_route(layer: Any, x: Tensor, train: bool) -> Callable:
    """The choice under ``torch.compile``: forced, else the static one; no cache is touched."""
    name = _forced_choice(layer, x, True) or static_choice(layer, None, x, x.shape[0], train, compiling=True)
    return route(type(layer), name)


def choose(layer: Any, x: Tensor, native: Any = None) -> str:
    """The backend ``layer(x)`` uses for this input (deciding it, and tuning when on, if needed)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"choose: x must be a torch.Tensor, got {type(x).__name__}")
    x2 = x.reshape(-1, layer.in_features)
    train = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    if torch.compiler.is_compiling():
        name = _forced_choice(layer, x2, True)
        return name or static_choice(layer, None, x2, x2.shape[0], train, compiling=True)
    f = facts(layer)
    if not (plain(x2) and f.plain_device):
        return NATIVE
    if f.cast_from is not None and x2.dtype == f.cast_from:
        x2 = x2.to(f.dtype)
    key = key_of(x2.shape[0], train)
    if key not in f.names:
        resolve(layer, f, key, x2)
    return f.names[key]


def matmul(layer: Any, x: Tensor, native: Any = None) -> Tensor:
    """``(batch, in) -> (batch, out)`` without bias, through the backend ``layer(x)`` would use."""
    name = choose(layer, x)
    return route(type(layer), name)(layer, x, None)


# ------------------------------------------------------------------------------------------ dense
def _build_dense(layer: Any) -> Tensor:
    """``W (out, in)`` as the structure's default multiply of the identity: ``layer.flops(in)`` FLOPs,
    which beats ``to_dense()`` where that is a product of dense factors (butterfly)."""
    first = next(layer.parameters(), None)
    if first is None:
        return layer.to_dense()
    eye = torch.eye(layer.in_features, dtype=layer.weight_dtype, device=first.device)
    compiling = torch.compiler.is_compiling()
    plain_eye = not compiling and plain(eye)
    name = static_choice(layer, None, eye, layer.in_features, torch.is_grad_enabled(), compiling=compiling,
                         dense_ok=False) if (plain_eye or compiling) else NATIVE
    return route(type(layer), name)(layer, eye, None).transpose(0, 1)


def dense_weight(layer: Any, native: Any = None) -> Tensor:
    """The layer's dense ``(out, in)`` weight: cached while its parameters are unchanged (same tensors,
    ``_version`` and data pointer) when no gradient is needed, rebuilt differentiably otherwise."""
    if torch.compiler.is_compiling():
        return _build_dense(layer)
    f = facts(layer)
    bias = layer._parameters.get("bias")
    ps = [p for m in f.owners for p in m._parameters.values() if p is not None and p is not bias]
    if torch.is_grad_enabled() and any(p.requires_grad for p in ps):
        return _build_dense(layer)
    try:
        ver = tuple((p._version, p.data_ptr()) for p in ps)
    except RuntimeError:  # inference tensors carry no version counter: no caching
        with torch.no_grad():
            return _build_dense(layer)
    hit = f.dense
    if hit is not None and hit[1] == ver and len(hit[0]) == len(ps) and all(a is b for a, b in zip(hit[0], ps)):
        return hit[2]
    with torch.no_grad():
        w = _build_dense(layer).contiguous()
    f.dense = (tuple(ps), ver, w)
    return w


# ------------------------------------------------------------------------------------------ tuning
def _time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _lower_bound(name: str, layer: Any, x: Tensor, train: bool) -> float:
    """Seconds the backend needs at least: its FLOPs at :data:`PEAK_FLOPS` (x8 for 16-bit types) and,
    for the dense weight, reading it at :data:`PEAK_BYTES`."""
    batch = x.shape[0]
    mem = 0.0
    spec = type(layer).kernels.get(name)
    if name == DENSE:
        f = 2.0 * layer.in_features * layer.out_features * batch
        if train:  # the dense weight is rebuilt (and differentiated) every step
            with contextlib.suppress(NotImplementedError):
                f += float(layer.flops(layer.in_features))
        mem = layer.in_features * layer.out_features * x.element_size() / PEAK_BYTES
    elif spec is not None and spec.flops is not None:
        f = spec.flops(layer, batch)
    else:
        try:
            f = float(layer.flops(batch))
        except NotImplementedError:
            f = 0.0
    peak = PEAK_FLOPS * (8.0 if x.dtype in (torch.bfloat16, torch.float16) else 1.0)
    return max(f * (3.0 if train else 1.0) / peak, mem)


def _tune(key: tuple, layer: Any, f: Facts, x: Tensor, train: bool) -> str:
    """Time the candidates on a random input of the real shape, interleaved round by round (so a burst
    of load from other processes hits them alike), keeping each one's fastest call: forward under
    ``no_grad``, or forward + backward through ``torch.autograd.grad`` when training (no ``.grad`` is
    touched). Candidates whose FLOPs (or, for dense, bytes) cannot beat the best time so far are skipped;
    the static choice is kept unless another is :data:`MARGIN` faster."""
    timer = STATE.timer or (lambda name, fn: _time_once(fn))
    default = static_choice(layer, f, x, x.shape[0], train)
    cands = [NATIVE, *(n for n, s in type(layer).kernels.items() if s.auto and s.usable(x)), DENSE]
    times: dict[str, list[float]] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        xr = torch.randn(x.shape, dtype=x.dtype, device=x.device)
        if train:
            xr.requires_grad_(x.requires_grad)
        params = [p for p in layer.parameters() if p.requires_grad]
        inputs = ([xr] if xr.requires_grad else []) + params
        steps = {}
        for name in cands:
            run = route(type(layer), name)
            if train and inputs:
                def step(run=run):
                    y = run(layer, xr, None)
                    torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)
            else:
                def step(run=run):
                    with torch.no_grad():
                        run(layer, xr, None)
            steps[name] = step
        best = math.inf
        for name in sorted(cands, key=lambda n: _lower_bound(n, layer, x, train)):
            if _lower_bound(name, layer, x, train) > 1.5 * best:
                continue
            try:
                timer(name, steps[name])  # warm-up (also fills caches)
                t = timer(name, steps[name])
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
                    t = timer(name, steps[name])
                    v.append(t)
                    spent += t
            rounds += 1
    results = {k: min(v) for k, v in times.items()}
    _TIMINGS[key] = results
    if not results:
        return default
    winner = min(results, key=results.__getitem__)
    if default in results and results[default] <= MARGIN * results[winner]:
        return default
    return winner
