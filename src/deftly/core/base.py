"""The base class of every structured layer: a drop-in replacement for ``nn.Linear``.

A structure subclasses :class:`StructuredLinear`, sets a ``name``, registers itself with
:func:`deftly.core.registry.register`, and implements five things that live together in its module:

* ``_matmul(x)``            fast multiply, ``(batch, in_features) -> (batch, out_features)``, no bias;
* ``_reference_matmul(x)``  a slow, obviously-correct multiply (explicit loops over blocks/factors);
* ``to_dense()``            the ``(out_features, in_features)`` matrix built from the parameters;
* ``param_count`` / ``flop_count`` (classmethods) exact analytic counts, padding included;
* ``_reset_structure()``    a structure-aware init whose output variance matches ``nn.Linear``.

Optionally, fast kernels: a class attribute ``kernels = {name: deftly.kernels.KernelSpec(fn, ...)}`` and a
method ``_kernel_args()`` returning the tensors and sizes ``fn(x, *args)`` takes (kernels never see the
layer). The base class does the rest: the choice between ``_matmul``, the kernels and the cached dense
weight (:mod:`deftly.core.dispatch`, decided once per batch bucket and mode), input checks with clear
errors, leading batch dimensions, the bias, ``num_params``/``flops``/``compression``, ``extra_repr``
and the generic test-suite hooks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import dispatch as _dsp
from .partition import sync_derived_buffers
from .projection import project_layer_

__all__ = ["StructuredLinear", "check_int", "init_uniform_"]

# per-call checks of the forward, bound once (each is a C call)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_dispatch_stack = torch._C._len_torch_dispatch_stack
_any_autocast = torch._C._is_any_autocast_enabled
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_STATE = _dsp.STATE
_FACTS = _dsp._CACHE_ATTR


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
              fix: str = "") -> int:
    """Validate an integer hyperparameter and return it; raise ``ValueError`` naming value and fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name}={value} is invalid; it must be >= {minimum}. {fix}".rstrip())
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name}={value} is invalid; it must be <= {maximum}. {fix}".rstrip())
    return value


def _random_fill_(tensor: Tensor, fill) -> Tensor:
    """``fill(t)`` draws ``t``'s values in place. A ``DTensor`` (a parameter sharded by FSDP2, e.g. after
    meta-device deferred init) is drawn as the full tensor on every rank, each keeping its own shard: the
    values equal an unsharded init under the same seed on any number of ranks (torch's CPU DTensor random
    ops would draw every shard from the same generator state: identical shards)."""
    dt = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless this was imported
    if dt is None or not isinstance(tensor, dt.DTensor):
        fill(tensor)
        return tensor
    full = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.to_local().device)
    fill(full)
    tensor.copy_(dt.distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None))
    return tensor


def init_uniform_(tensor: Tensor, variance: float, scale: Tensor | None = None) -> Tensor:
    """Fill ``tensor`` in place from a zero-mean uniform law with the given variance (then multiply by
    ``scale``, a plain tensor broadcastable to the full shape, e.g. a per-row std times a mask).

    Complex tensors split the variance evenly between real and imaginary parts. Sharded (``DTensor``)
    parameters get the values of the unsharded init (see :func:`_random_fill_`).
    """

    def fill(t: Tensor) -> None:
        if t.is_complex():
            bound = math.sqrt(3.0 * variance / 2.0)
            real = torch.empty(t.shape, dtype=t.real.dtype, device=t.device)
            imag = torch.empty_like(real)
            real.uniform_(-bound, bound)
            imag.uniform_(-bound, bound)
            t.copy_(torch.complex(real, imag))
        else:
            bound = math.sqrt(3.0 * variance)
            t.uniform_(-bound, bound)
        if scale is not None:
            t.mul_(scale.to(device=t.device, dtype=t.dtype))

    with torch.no_grad():
        return _random_fill_(tensor, fill)


class StructuredLinear(nn.Module):
    """A linear map ``y = x @ W.T + b`` whose ``W`` is never stored densely.

    Args:
        in_features: size of each input sample (any positive int).
        out_features: size of each output sample (any positive int).
        bias: learn an additive bias, as in ``nn.Linear``.
        device, dtype: factory arguments for the parameters.
    """

    #: registry name, set by each subclass
    name: ClassVar[str] = ""
    #: ``torch.utils.flop_counter.FlopCounterMode`` sees every multiply of ``forward``
    #: (False for structures whose multiply is elementwise, e.g. butterfly, banded)
    flop_counter_exact: ClassVar[bool] = True
    #: the structure adds a fixed (non-learned) map such as an identity residual; the generic
    #: init-variance test compares only the learned part, see :meth:`fixed_residual`
    has_fixed_residual: ClassVar[bool] = False
    #: the structure's fast multiplies, ``{backend name: deftly.kernels.KernelSpec}``; each is called as
    #: ``spec.fn(x, *self._kernel_args())`` (see :mod:`deftly.core.dispatch`)
    kernels: ClassVar[dict[str, Any]] = {}

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_int(owner, "in_features", in_features)
        self.out_features = check_int(owner, "out_features", out_features)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"{owner}: dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise TypeError(f"{owner}: dtype={dtype} is not a floating or complex dtype; "
                            "use e.g. torch.float32, torch.bfloat16 or torch.float64")
        self._factory = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ to implement
    def _matmul(self, x: Tensor) -> Tensor:  # (batch, in) -> (batch, out)
        raise NotImplementedError

    def _reference_matmul(self, x: Tensor) -> Tensor:  # (batch, in) -> (batch, out)
        raise NotImplementedError

    def _kernel_args(self) -> tuple:
        """The tensors and sizes the structure's :attr:`kernels` take after ``x`` (read live each call:
        ``torch.func.functional_call`` swaps parameters)."""
        raise NotImplementedError(f"{type(self).__name__} declares kernels but no _kernel_args()")

    def to_dense(self) -> Tensor:
        """The ``(out_features, in_features)`` weight this layer multiplies by (bias excluded)."""
        raise NotImplementedError

    def _reset_structure(self) -> None:
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The structure's hyperparameters: ``make(name, in, out, **hparams())`` rebuilds it."""
        return {}

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *args: Any, **hparams: Any) -> int:
        """Exact number of stored weight entries (bias excluded) for these sizes. (``*args: Any,
        **hparams: Any`` lets each structure declare its own hyperparameters: mypy accepts any override.)"""
        raise NotImplementedError

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *args: Any, **hparams: Any) -> int:
        """Exact FLOPs per input row of the fast multiply: 2 x multiply-adds, padding included."""
        raise NotImplementedError

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict[str, Any]]:
        """Valid hyperparameter sets for these sizes, used by the generic tests and ``deftly show``."""
        return [{}]

    # ------------------------------------------------------------------ projection and budgets
    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        """Set the structured parameters (not the bias) to a closed-form projection of ``weight``.

        ``weight``: float64 (complex128 for complex layers) ``(out_features, in_features)`` on the
        layer's device. ``cov``: ``None`` (minimise ``||W - S||_F``) or the ``(in, in)`` float64 input
        second moment ``C`` (minimise ``||(W - S) C^{1/2}||_F``, the output error on calibration inputs).
        Returns True when the result minimises the requested objective as well as deftly knows (no
        gradient refinement follows), False when it is only a starting point (deftly then refines it by
        L-BFGS on that objective). Raise ``NotImplementedError`` (the default) when the structure has no
        closed form: :meth:`project_` then fits it by L-BFGS (:func:`deftly.core.projection.fit_`).
        """
        raise NotImplementedError

    def project_(self, weight: Tensor, bias: Tensor | None = None, *, calibration: Any = None,
                 method: str = "auto", steps: int | None = None, seed: int = 0) -> float:
        """Set this layer to the best structured approximation of the dense ``weight`` and return the
        relative error.

        ``weight`` is ``(out_features, in_features)`` as in ``nn.Linear``; ``bias`` is copied (``None``
        zeroes the layer's bias). Without ``calibration`` the error is ``||W - S||_F / ||W||_F``; with
        calibration inputs ``X: (n_samples, in_features)`` (or a :class:`deftly.core.projection.Calibration`) the
        projection minimises, and the error is, the relative output error ``||(W - S) X^T||_F /
        ||W X^T||_F``. Uses the structure's closed form (``_project_closed_form``) when it has one and
        a deterministic L-BFGS fit otherwise (``method="auto"``; or force ``"closed"`` / ``"fit"``;
        ``steps``: L-BFGS iterations; ``seed``: the fit's starting init). See :mod:`deftly.core.projection`.
        """
        return project_layer_(self, weight, bias, calibration=calibration, method=method, steps=steps,
                              seed=seed).error

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> Iterable[dict[str, Any]]:
        """Every hyperparameter set worth considering for these sizes, for budgeted surgery: deftly
        picks the one with the largest ``param_count`` (or ``flop_count``) within the budget. Default:
        :meth:`examples`; structures override it with a finer grid (all ranks, all block counts...)."""
        return cls.examples(in_features, out_features)

    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *args: Any, **hparams: Any) -> float:
        """How far these hyperparameters are from the shape a practitioner would choose (0 = the
        structure's published parametrisation; padding, lopsided blocks and extra factors cost more).
        The budget solver (:func:`deftly.surgery.budget.choose_hparams`) takes, among the candidates
        that fill the budget nearly as well as the fullest one, the one with the lowest score."""
        return 0.0

    # ------------------------------------------------------------------ shared behaviour
    def reset_parameters(self) -> None:
        """Structure-aware init (see each structure) and ``nn.Linear``'s bias init; index buffers are
        re-derived from sizes (:class:`deftly.core.partition.DerivedBuffers`), so a layer built on the
        meta device, then ``to_empty(device=...)``, then ``reset_parameters()`` is a correct layer."""
        sync_derived_buffers(self)
        self._reset_structure()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                _random_fill_(self.bias, lambda t: t.uniform_(-bound, bound))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # index buffers are not state: re-derive them where the loaded parameters live (assign=True
        # into a meta-built layer moves the parameters; nothing else would move the buffers)
        super()._load_from_state_dict(*args, **kwargs)
        sync_derived_buffers(self)
        _dsp.drop_facts(self)  # assign=True may change dtype/device or the parameter tensors

    # ------------------------------------------------------------------ dispatch state
    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        _dsp.drop_facts(self)  # .to / .half / .cuda / to_empty: new dtype, device or tensors
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if _FACTS in d and isinstance(value, (Tensor, nn.Module)):
            # a new part, a new name, or a tensor of another dtype/device: re-derive the facts (FSDP2 swaps
            # sharded and unsharded parameters of the same dtype and device every step: kept)
            old = d["_parameters"].get(name, d["_buffers"].get(name))
            if isinstance(value, nn.Module) or old is None or old.dtype != value.dtype or \
                    old.device != value.device:
                del d[_FACTS]
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop(_FACTS, None)  # never pickled or deep-copied: rebuilt on the next call
        return state

    @property
    def kernel_backend(self) -> str | None:
        """The backend forced for this layer (``None``: the global policy, see :mod:`deftly.kernels`):
        ``"native"``, ``"dense"`` or a name of :attr:`kernels`; an unknown name is a ``ValueError``."""
        return self.__dict__.get("kernel_backend")

    @kernel_backend.setter
    def kernel_backend(self, name: str | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{type(self).__name__}: kernel_backend must be a str or None, got {name!r}")
        if name is not None:
            _dsp.check_layer_backend(self, name)
        name = None if name == _dsp.AUTO else name
        self.__dict__["kernel_backend"] = name
        f = self.__dict__.get(_FACTS)
        if f is not None:
            f.select(name)

    @kernel_backend.deleter
    def kernel_backend(self) -> None:
        self.kernel_backend = None

    @property
    def weight_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point() or b.is_complex():
                return b.dtype
        return torch.get_default_dtype()

    def _check_input(self, x: Tensor) -> Tensor:
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
        wdev = next((p.device for p in self.parameters()), None)
        if wdev is not None and x.device != wdev:
            raise ValueError(f"{owner}: input is on device {x.device} but the layer's parameters are on {wdev}; "
                             f"move the input (x.to({str(wdev)!r})) or the layer (layer.to({str(x.device)!r}))")
        if x.dim() == 0:
            raise ValueError(f"{owner}: input is a 0-d tensor; expected shape (*, {self.in_features})")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{owner}: input has last dimension {x.shape[-1]} but in_features={self.in_features} "
                f"(input shape {tuple(x.shape)}); pass inputs of shape (*, {self.in_features}) "
                f"or build the layer with in_features={x.shape[-1]}")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{owner}: input dtype {x.dtype} is not floating point; "
                            f"cast it first, e.g. x.to({self.weight_dtype})")
        wd = self.weight_dtype
        if x.dtype != wd:
            if wd.is_complex and not x.is_complex():
                return x.to(wd)
            if not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"{owner}: input dtype {x.dtype} does not match the layer's {wd}; "
                                f"cast the input (x.to({wd})) or the layer (layer.to({x.dtype}))")
        return x

    def _apply_rows(self, x: Tensor, matmul) -> Tensor:
        x = self._check_input(x)
        lead = x.shape[:-1]
        y = matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``(*, in_features) -> (*, out_features)`` without materialising the dense weight.

        The multiply is the backend chosen once per (batch bucket, mode) by :mod:`deftly.core.dispatch`
        (a kernel, the structure's own ``_matmul`` or the cached dense weight; bias fused where the
        kernel allows). The fast path checks only the last size, dtype and device against cached facts;
        the full diagnosis (:meth:`_check_input`) runs when one of them differs."""
        if _is_compiling():
            return self._forward_traced(x)
        f = self.__dict__.get(_FACTS)
        if f is None or f.gen != _STATE.gen:
            f = _dsp.facts(self)
        try:
            shape, dt = x.shape, x.dtype
            ok = shape[-1] == f.in_features and (dt is f.dtype or dt is f.cast_from) and x.device == f.device
        except (AttributeError, IndexError, TypeError):
            ok = False
        if ok:
            if dt is not f.dtype:  # a real input to a complex layer
                x = x.to(f.dtype)
        else:
            x = self._check_input(x)  # raises with the diagnosis, casts, or lets autocast inputs pass
            shape = x.shape
            if x.device != f.device or (x.dtype is not f.dtype and x.dtype == self.weight_dtype):
                _dsp.drop_facts(self)  # parameters changed under the cache (e.g. ``.data = ...``)
                f = _dsp.facts(self)
        x2 = x if len(shape) == 2 else x.reshape(-1, f.in_features)
        if (f.plain_device and x.dtype is f.dtype and not _dispatch_stack() and not _any_autocast()
                and not _wrapped(x)):
            train = _grad_enabled() and (x.requires_grad or _dsp.params_need_grad(f))
            b = x2.shape[0]
            key = ((b - 1).bit_length() if b > 1 else 0) * 2 + train
            run = f.routes.get(key) or _dsp.resolve(self, f, key, x2)
            y = run(self, x2, self._parameters.get("bias"))
        else:  # functorch transforms, autocast, dispatch modes (FlopCounterMode), meta, parametrizations
            y = _dsp.route(type(self), _dsp.NATIVE)(self, x2, self.bias)
        return y if len(shape) == 2 else y.reshape(*shape[:-1], self.out_features)

    def _forward_traced(self, x: Tensor) -> Tensor:
        """The forward under ``torch.compile``: full checks, the forced or static choice, no caches."""
        x = self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bias = self.bias
        if x.device.type in ("cpu", "cuda") and not torch.nn.utils.parametrize.is_parametrized(self):
            train = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            y = _dsp.traced_route(self, x2, train)(self, x2, bias)
        else:
            y = _dsp.route(type(self), _dsp.NATIVE)(self, x2, bias)
        return y.reshape(*lead, self.out_features)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same map through the slow reference multiply (for tests)."""
        return self._apply_rows(x, self._reference_matmul)

    def fixed_residual(self, x: Tensor) -> Tensor:
        """The non-learned part of the map (zero unless ``has_fixed_residual``)."""
        return torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)

    def num_params(self) -> int:
        """Exact parameter count, bias included (equals ``sum(p.numel())``)."""
        n = type(self).param_count(self.in_features, self.out_features, **self.hparams())
        return n + (self.out_features if self.bias is not None else 0)

    def flops(self, batch: int = 1) -> int:
        """FLOPs of one forward for ``batch`` rows: 2 x multiply-adds, padding included, bias adds not
        counted (the convention of ``torch.utils.flop_counter``). Complex multiply-adds count 4 real."""
        per_row = type(self).flop_count(self.in_features, self.out_features, **self.hparams())
        return batch * per_row

    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def compression(self) -> float:
        """Dense parameters / structured parameters (bias included on both sides)."""
        return self.dense_params() / max(self.num_params(), 1)

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams().items())
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}"]
        if hp:
            parts.append(hp)
        c = self.compression()
        ratio = f"{c:.2f}x fewer than dense" if c >= 1 else f"{1 / c:.2f}x more than dense"
        parts.append(f"params={self.num_params()} ({ratio})")
        return ", ".join(parts)
