"""fp16 / bf16: every structure, forward + backward through a 24-layer stack, stays finite and accurate.

Two stacks, as a user would build them (width 64, batch 8, unit-normal inputs, the structure's first
``examples()`` entry, deftly's own init — no tuning):

* **residual** (the transformer way): 24 pre-norm blocks ``x = x + layer(gelu(LayerNorm(x)))``. The init
  keeps activations bounded (the residual stream grows like sqrt(depth)). Checked: output, input gradient
  and every parameter gradient finite; output RMS bounded; the relative error against the same weights run
  in float32 within a fixed budget and within 3x of the dense layer's error (a structure that needed fp32
  accumulation would stand out here);
* **plain** (an nn.Linear MLP with every Linear swapped): 24 x ``tanh(layer(x))``. nn.Linear's init
  (variance 1/(3 fan_in)) shrinks the signal per layer; the bias keeps the activations at ~0.06 RMS, but the
  input gradient decays to ~1e-9 in float32, below float16's subnormal range, for dense exactly as for
  every structure: float16 training of such a stack needs loss scaling (``torch.amp.GradScaler``). Checked:
  everything finite, activations bounded away from 0 and from overflow.

Plus ``torch.autocast`` (float32 parameters, bf16/fp16 compute) through the residual stack. Complex
structures are skipped in half precision: torch has no complex float16/bfloat16 arithmetic on CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deftly

D, DEPTH, BATCH = 64, 24, 8
HALF = [torch.float16, torch.bfloat16]
# relative error budgets vs float32 (measured at D=128: fp16 1.2e-3..1.7e-3, bf16 1.0e-2..1.4e-2)
OUT_BUDGET = {torch.float16: 1e-2, torch.bfloat16: 6e-2}
GRAD_BUDGET = {torch.float16: 2e-2, torch.bfloat16: 1.2e-1}


class ResidualStack(nn.Module):
    def __init__(self, name: str, params: dict):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(DEPTH))
        self.layers = nn.ModuleList(deftly.make(name, D, D, **params) for _ in range(DEPTH))

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(F.gelu(norm(x)))
        return x


class PlainStack(nn.Module):
    def __init__(self, name: str, params: dict):
        super().__init__()
        self.layers = nn.ModuleList(deftly.make(name, D, D, **params) for _ in range(DEPTH))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def first_example(name):
    params = deftly.get(name).examples(D, D)[0]
    if any(p.is_complex() for p in deftly.make(name, 4, 4, **deftly.get(name).examples(4, 4)[0]).parameters()):
        pytest.skip(f"{name}'s first example is complex: no complex float16/bfloat16 arithmetic in torch")
    return params


def run(model: nn.Module, dtype: torch.dtype, autocast: bool = False):
    """Forward + backward of mean(y^2) on unit-normal inputs; (y, x.grad, [param grads]) as float32."""
    x = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(1))
    x = (x if autocast else x.to(dtype)).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if autocast:
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
    else:
        y = model(x)
    y.float().pow(2).mean().backward()
    grads = [p.grad.float() if p.grad is not None else torch.zeros(()) for p in model.parameters()]
    return y.detach().float(), x.grad.float(), grads


@functools.cache
def reference(kind: str, name: str):
    """The float32 stack (fixed seed) and its outputs."""
    torch.manual_seed(0)
    cls = ResidualStack if kind == "residual" else PlainStack
    model = cls(name, first_example(name))
    return model, run(model, torch.float32)


def rel(a, b) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


def all_finite(y, gx, grads) -> bool:
    return bool(torch.isfinite(y).all() and torch.isfinite(gx).all() and all(torch.isfinite(g).all() for g in grads))


def low_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", deftly.structures())
def test_residual_stack_half_precision(name, dtype):
    model32, (y32, gx32, gp32) = reference("residual", name)
    model = low_precision_copy(model32, dtype)
    y, gx, gp = run(model, dtype)
    assert all_finite(y, gx, gp), f"{name} {dtype}: non-finite forward/backward"
    rms = float(y.pow(2).mean().sqrt())
    assert 0.1 < rms < 100, f"{name} {dtype}: output RMS {rms} (activations not bounded)"
    err_y, err_g = rel(y, y32), max(rel(gx, gx32), max(rel(a, b) for a, b in zip(gp, gp32)))
    assert err_y <= OUT_BUDGET[dtype], f"{name} {dtype}: output rel. error {err_y:.2e}"
    assert err_g <= GRAD_BUDGET[dtype], f"{name} {dtype}: gradient rel. error {err_g:.2e}"
    if name != "dense":
        dense32, (dy32, _, _) = reference("residual", "dense")
        dy, _, _ = run(low_precision_copy(dense32, dtype), dtype)
        dense_err = rel(dy, dy32)
        assert err_y <= 3 * dense_err + 1e-4, \
            f"{name} {dtype}: output error {err_y:.2e} vs dense {dense_err:.2e}: needs fp32 accumulation?"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", deftly.structures())
def test_plain_stack_half_precision_finite(name, dtype):
    model32, (y32, _, _) = reference("plain", name)
    y, gx, gp = run(low_precision_copy(model32, dtype), dtype)
    assert all_finite(y, gx, gp), f"{name} {dtype}: non-finite forward/backward"
    rms, rms32 = float(y.pow(2).mean().sqrt()), float(y32.pow(2).mean().sqrt())
    assert 1e-3 < rms < 10, f"{name} {dtype}: output RMS {rms}"
    assert abs(rms / rms32 - 1) < 0.1, (rms, rms32)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", deftly.structures())
def test_autocast_residual_stack(name, dtype):
    """float32 parameters, half-precision compute under torch.autocast (the usual mixed precision)."""
    model32, (y32, _, _) = reference("residual", name)
    y, gx, gp = run(model32, dtype, autocast=True)
    assert all_finite(y, gx, gp), f"{name} autocast {dtype}: non-finite"
    assert rel(y, y32) <= OUT_BUDGET[dtype], f"{name} autocast {dtype}: rel. error {rel(y, y32):.2e}"
