"""Parametrizations that make structured layers shardable by FSDP2 (complex -> real/imag, 0-d -> 1-d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _ComplexAsRealImag(nn.Module):
    """A complex parameter stored as two real ones: ``original0`` (real part), ``original1`` (imag)."""

    def forward(self, real: Tensor, imag: Tensor) -> Tensor:
        return torch.complex(real, imag)

    def right_inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.real.contiguous().clone(), z.imag.contiguous().clone()


class _ScalarAsVector(nn.Module):
    """A 0-d parameter stored as a 1-element vector (FSDP2 refuses 0-d parameters)."""

    def forward(self, v: Tensor) -> Tensor:
        return v.reshape(())

    def right_inverse(self, s: Tensor) -> Tensor:
        return s.reshape(1).clone()


_CONVERTED = "_deftly_fsdp2_converted"  # root attribute: {user fqn: (kind, [stored fqns])}


def _fqn(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert_for_fsdp2(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    from torch.nn.utils import parametrize

    converted: dict[str, tuple[str, list[str]]] = {}
    for mod_name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            continue  # user parametrizations: left alone
        for name, p in list(module.named_parameters(recurse=False)):
            par: nn.Module
            if p.is_complex():
                kind, par = "complex", _ComplexAsRealImag()
            elif p.dim() == 0:
                kind, par = "scalar", _ScalarAsVector()
            else:
                continue
            attrs = dict(p.__dict__)
            parametrize.register_parametrization(module, name, par, unsafe=True)
            stored = module.parametrizations[name]
            base = _fqn(mod_name, f"parametrizations.{name}")
            if kind == "complex":
                originals = [_fqn(base, "original0"), _fqn(base, "original1")]
                params = [stored.original0, stored.original1]
            else:
                originals = [_fqn(base, "original")]
                params = [stored.original]
            for q in params:
                q.requires_grad_(p.requires_grad)
                for k, v in attrs.items():
                    setattr(q, k, v)
            converted[_fqn(mod_name, name)] = (kind, originals)
    return converted


def _to_stored(converted: dict[str, tuple[str, list[str]]], sd: dict[str, Any]) -> dict[str, Any]:
    """User-facing (single-process) keys -> the keys of a converted FSDP2 model."""
    out = dict(sd)
    for key, (kind, originals) in converted.items():
        if key not in out:
            continue
        t = out.pop(key)
        if kind == "complex":
            out[originals[0]], out[originals[1]] = t.real.contiguous(), t.imag.contiguous()
        else:
            out[originals[0]] = t.reshape(1)
    return out


def _from_stored(converted: dict[str, tuple[str, list[str]]], sd: dict[str, Any]) -> dict[str, Any]:
    out = dict(sd)
    for key, (kind, originals) in converted.items():
        if not all(o in out for o in originals):
            continue
        parts = [out.pop(o) for o in originals]
        if kind == "complex":
            out[key] = torch.complex(parts[0], parts[1]) if isinstance(parts[0], Tensor) else parts[0]
        else:
            out[key] = parts[0].reshape(()) if isinstance(parts[0], Tensor) else parts[0]
    return out
