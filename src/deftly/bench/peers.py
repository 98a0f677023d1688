"""Peer implementations from PyPI (cola-ml, PEFT) wrapped as modules, when importable, and fly's published
Monarch multiply written out as a baseline (:mod:`.fly_ref`, always available)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TypeAlias

import torch
from torch import Tensor, nn

from .config import bench_hparams
from .fly_ref import FlyMonarch


class _ColaModule(nn.Module):
    def __init__(self, kind: str, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        super().__init__()
        import cola

        self.kind, self.in_features, self.out_features = kind, in_f, out_f
        self._cola = cola
        g = torch.Generator().manual_seed(0)
        if kind == "kronecker":
            a_in, a_out = math.isqrt(in_f), math.isqrt(out_f)
            if a_in * a_in != in_f or a_out * a_out != out_f:
                raise ValueError("cola kronecker needs square-number sizes")
            self.A = nn.Parameter(torch.randn(a_out, a_in, generator=g, dtype=dtype) / math.sqrt(a_in))
            self.B = nn.Parameter(torch.randn(a_out, a_in, generator=g, dtype=dtype) / math.sqrt(a_in))
            self._flops = 2 * (a_out * a_in * a_in + a_out * a_out * a_in)
        elif kind == "blockdiag":
            k = math.isqrt(min(in_f, out_f))
            if in_f % k or out_f % k:
                raise ValueError("cola blockdiag needs divisible sizes")
            self.W = nn.ParameterList(nn.Parameter(torch.randn(out_f // k, in_f // k, generator=g, dtype=dtype))
                                      for _ in range(k))
            self._flops = 2 * in_f * out_f // k
            self.nblocks = k
        elif kind == "lowrank":
            r = 16
            self.U = nn.Parameter(torch.randn(out_f, r, generator=g, dtype=dtype) / 4)
            self.V = nn.Parameter(torch.randn(r, in_f, generator=g, dtype=dtype) / math.sqrt(in_f))
            self._flops = 2 * r * (in_f + out_f)
        else:  # pragma: no cover
            raise ValueError(kind)

    def op(self):
        ops = self._cola.ops
        if self.kind == "kronecker":
            return ops.Kronecker(ops.Dense(self.A), ops.Dense(self.B))
        if self.kind == "blockdiag":
            return ops.BlockDiag(*[ops.Dense(w) for w in self.W])
        return ops.Dense(self.U) @ ops.Dense(self.V)

    def forward(self, x: Tensor) -> Tensor:
        return (self.op() @ x.T).T

    def flops(self, batch: int = 1) -> int:
        return batch * self._flops

    def hparams(self) -> dict:
        return {"kronecker": {}, "blockdiag": {"nblocks": getattr(self, "nblocks", 0)},
                "lowrank": {"rank": 16}}[self.kind]


class _PeftModule(nn.Module):
    def __init__(self, kind: str, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        super().__init__()
        import peft

        class _M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(in_f, out_f, dtype=dtype)

            def forward(self, x: Tensor) -> Tensor:
                return self.lin(x)

        self.kind, self.in_features, self.out_features = kind, in_f, out_f
        with _quiet_warnings():
            if kind == "lora":
                cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["lin"])
                self._hp = {"r": 16}
                self._flops = 2 * in_f * out_f + 2 * 16 * (in_f + out_f)
            else:
                cfg = peft.BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=1, target_modules=["lin"])
                self._hp = {"boft_block_size": 32, "boft_n_butterfly_factor": 1}
                # frozen dense weight rotated by the block-orthogonal matrix, then the dense multiply
                self._flops = 2 * in_f * out_f
            self.model = peft.get_peft_model(_M(), cfg)
        self.model.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def flops(self, batch: int = 1) -> int:
        return batch * self._flops

    def hparams(self) -> dict:
        return dict(self._hp)


#: a peer implementation: each has ``flops(batch)`` and ``hparams()`` like a deftly structure
Peer: TypeAlias = "_ColaModule | _PeftModule | FlyMonarch"

PEERS: dict[str, Callable[[int, int, torch.dtype], Peer]] = {
    "cola.kronecker": lambda i, o, d: _ColaModule("kronecker", i, o, d),
    "cola.blockdiag": lambda i, o, d: _ColaModule("blockdiag", i, o, d),
    "cola.lowrank": lambda i, o, d: _ColaModule("lowrank", i, o, d),
    "peft.lora": lambda i, o, d: _PeftModule("lora", i, o, d),
    "peft.boft": lambda i, o, d: _PeftModule("boft", i, o, d),
    "fly.monarch": lambda i, o, d: _fly_monarch(i, o, d),
}


def _fly_monarch(in_f: int, out_f: int, dtype: torch.dtype) -> FlyMonarch:
    """fly's two-bmm Monarch with the suite's Monarch blocks (``out_blocks`` as deftly's default)."""
    k = bench_hparams("monarch", in_f, out_f)["nblocks"]
    return FlyMonarch(in_f, out_f, nblocks=k, out_blocks=min(k, out_f), dtype=dtype)


def peers_available() -> dict[str, str]:
    """``{peer family: version or reason it is skipped}``."""
    out = {"fly": "deftly.bench.fly_ref (written from the paper)"}
    for mod in ("cola", "peft"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception as err:  # noqa: BLE001 - any import failure means "not available"
            out[mod] = f"skipped: {type(err).__name__}: {err}"
    return out


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
