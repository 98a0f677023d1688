"""``deftly.project(weight, structure, **hparams)``: build a layer and project a dense weight onto it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.base import StructuredLinear
from ..core.projection import project_layer_
from ..core.registry import get, make

__all__ = ["project"]

def project(weight: Tensor, structure: str, bias: Tensor | None = None, calibration: Any = None, *,
            method: str = "auto", steps: int | None = None, seed: int = 0, device: Any = None,
            dtype: torch.dtype | None = None, **params: Any) -> tuple[StructuredLinear, float]:
    """The structured layer closest to the dense ``weight`` (``(out, in)``) and its relative error.

    Args:
        weight: dense ``(out_features, in_features)`` weight (``nn.Linear.weight``; for a Hugging Face
            ``Conv1D`` pass ``conv.weight.T``).
        structure: a registered name (``deftly.structures()``).
        bias: carried over unchanged (the layer gets ``bias=True`` iff it is given).
        calibration: inputs ``X: (n_samples, in)`` (or a :class:`Calibration`): minimise the output
            error ``||(W - S) X^T||`` instead of ``||W - S||``.
        method: ``"auto"`` (closed form if the structure has one, else fitting), ``"closed"``, ``"fit"``.
        steps: L-BFGS iterations for fitting / refinement (default 500 for a fit from scratch, 50 to
            polish a closed form, 30 on the activation objective).
        **params: the structure's hyperparameters (``rank=...``, ``nblocks=...``).

    Returns:
        ``(layer, error)``: ``error = ||W - S||_F / ||W||_F``, or with calibration the relative output
        error ``||(W - S) X^T||_F / ||W X^T||_F``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"project: weight must be a 2-D (out_features, in_features) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    get(structure)
    out_f, in_f = weight.shape
    if dtype is None:
        dtype = weight.dtype if weight.is_floating_point() else None
    layer = make(structure, in_f, out_f, bias=bias is not None, device=device or weight.device, dtype=dtype,
                 **params)
    res = project_layer_(layer, weight, bias, calibration=calibration, method=method, steps=steps, seed=seed)
    return layer, res.error
