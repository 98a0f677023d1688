"""Module discovery for surgery: which modules are linear (``nn.Linear``, Hugging Face ``Conv1D``), their
shapes and dense weights, the already-structured ones, the output head, and swapping a module by name."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from ..core.base import StructuredLinear

__all__ = ["dense_weight", "is_conv1d", "is_linear_like", "is_wrapper", "linear_modules", "linear_shape",
           "model_params", "output_head", "set_module", "structured_modules"]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with ``weight: (in, out)``."""
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or a Hugging Face ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or ``Conv1D`` (transposed view for the latter)."""
    weight = cast(Tensor, module.weight)
    return weight.T if is_conv1d(module) else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)``."""
    w = dense_weight(module)
    return w.shape[1], w.shape[0]


def is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, StructuredLinear) or getattr(module, "is_deftly_adapter", False)


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear-like module that surgery may replace, in registration order
    (modules inside structured layers or adapters are skipped)."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if is_wrapper(mod):
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
        if name and is_wrapper(mod):
            out.append((name, mod))
    return out


def output_head(model: nn.Module, names: list[str]) -> str | None:
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


def model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
