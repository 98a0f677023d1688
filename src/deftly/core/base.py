"""The base class of every structured layer: a drop-in replacement for ``nn.Linear``.

A structure subclasses :class:`StructuredLinear`, sets a ``name``, registers itself with
:func:`deftly.core.registry.register`, and implements five things that live together in its module:

* ``_matmul(x)``            fast multiply, ``(batch, in_features) -> (batch, out_features)``, no bias;
* ``_reference_matmul(x)``  a slow, obviously-correct multiply (explicit loops over blocks/factors);
* ``to_dense()``            the ``(out_features, in_features)`` matrix built from the parameters;
* ``param_count`` / ``flop_count`` (classmethods) exact analytic counts, padding included;
* ``_reset_structure()``    a structure-aware init whose output variance matches ``nn.Linear``.

The base class does the rest: input checks with clear errors, leading batch dimensions, the bias,
``num_params``/``flops``/``compression``, ``extra_repr`` and the generic test-suite hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .projection import project_layer_

__all__ = ["StructuredLinear", "check_int", "init_uniform_"]


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


def init_uniform_(tensor: Tensor, variance: float) -> Tensor:
    """Fill ``tensor`` in place from a zero-mean uniform law with the given variance.

    Complex tensors split the variance evenly between real and imaginary parts.
    """
    with torch.no_grad():
        if tensor.is_complex():
            bound = math.sqrt(3.0 * variance / 2.0)
            real = torch.empty(tensor.shape, dtype=tensor.real.dtype, device=tensor.device)
            imag = torch.empty_like(real)
            real.uniform_(-bound, bound)
            imag.uniform_(-bound, bound)
            tensor.copy_(torch.complex(real, imag))
        else:
            bound = math.sqrt(3.0 * variance)
            tensor.uniform_(-bound, bound)
    return tensor


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

    def to_dense(self) -> Tensor:
        """The ``(out_features, in_features)`` weight this layer multiplies by (bias excluded)."""
        raise NotImplementedError

    def _reset_structure(self) -> None:
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        """The structure's hyperparameters: ``make(name, in, out, **hparams())`` rebuilds it."""
        return {}

    @classmethod
    def param_count(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        """Exact number of stored weight entries (bias excluded) for these sizes."""
        raise NotImplementedError

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, **hparams: Any) -> int:
        """Exact FLOPs per input row of the fast multiply: 2 x multiply-adds, padding included."""
        raise NotImplementedError

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict[str, Any]]:
        """Valid hyperparameter sets for these sizes, used by the generic tests and ``deftly show``."""
        return [{}]

    @classmethod
    def bad_examples(cls) -> list[dict[str, Any]]:
        """Hyperparameter sets that must be refused for a 16x16 layer (``ValueError``/``TypeError``
        whose message names the bad value); drives the generic bad-input test."""
        return []

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

    # ------------------------------------------------------------------ shared behaviour
    def reset_parameters(self) -> None:
        """Structure-aware init (see each structure) and ``nn.Linear``'s bias init."""
        self._reset_structure()
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

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
        """``(*, in_features) -> (*, out_features)`` without materialising the dense weight."""
        return self._apply_rows(x, self._matmul)

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
        parts.append(f"params={self.num_params()} ({self.compression():.2f}x fewer than dense)")
        return ", ".join(parts)
