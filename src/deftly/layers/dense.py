"""``dense``: the plain dense matrix, the reference every structure is compared with."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear, init_uniform_
from ..core.linalg import set_param_
from ..core.registry import register
from ..kernels import KernelSpec, linear_matmul


@register
class Dense(StructuredLinear):
    """A full ``(out_features, in_features)`` weight, identical to ``nn.Linear``."""

    name = "dense"
    #: F.linear(x, W, b)
    kernels: ClassVar[dict[str, KernelSpec]] = {"kernel": KernelSpec(linear_matmul, default=True, bias=True)}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **self._factory))
        self.reset_parameters()

    def _reset_structure(self) -> None:
        # nn.Linear's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), variance 1/(3 in)
        init_uniform_(self.weight, 1.0 / (3.0 * self.in_features))

    def _matmul(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (batch, out)

    def _kernel_args(self) -> tuple:
        return (self._parameters["weight"],)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # one dot product per output feature
        cols = [(x * self.weight[o]).sum(-1) for o in range(self.out_features)]
        return torch.stack(cols, dim=-1)

    def to_dense(self) -> Tensor:
        return self.weight

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        # the dense weight is its own projection, for any objective
        set_param_(self.weight, weight)
        return True

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        return [{}]

    @classmethod
    def param_count(cls, in_features: int, out_features: int) -> int:
        return in_features * out_features

    @classmethod
    def flop_count(cls, in_features: int, out_features: int) -> int:
        return 2 * in_features * out_features


def output_variance_scale(nfactors: int) -> float:
    """Per-factor gain so that a product of ``nfactors`` factors, each initialised with variance
    ``gain / fan_in``, has nn.Linear's output variance ``1/3`` on unit-variance inputs."""
    return (1.0 / 3.0) ** (1.0 / nfactors)


