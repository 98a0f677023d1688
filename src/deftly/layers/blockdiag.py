"""``blockdiag``: block-diagonal weight with ``nblocks`` rectangular blocks, as one batched matmul.

Any sizes: ``in`` and ``out`` are each split into ``nblocks`` contiguous blocks whose sizes differ by at
most one (:class:`deftly.core.partition.Partition`); short blocks are zero-padded inside the layer.
This is also the block-diagonal factor of Monarch (Dao et al., ICML 2022).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.linalg import fixed_support_operator, fixed_support_solve, set_param_
from ..core.partition import Partition, ceil_div
from ..core.registry import register
from ..kernels import (
    KernelSpec,
    blas,
    blockdiag_matmul,
    blockdiag_matmul_strided,
    blockdiag_matmul_triton,
    triton_usable,
)


def blockdiag_multiply(x: Tensor, weight: Tensor) -> Tensor:
    """``x: (batch, nblocks * bi)``, ``weight: (nblocks, bo, bi)`` -> ``(batch, nblocks * bo)``."""
    nb, bo, bi = weight.shape
    xb = x.reshape(-1, nb, bi).transpose(0, 1)  # (nblocks, batch, bi)
    y = torch.bmm(xb, weight.transpose(1, 2))  # (nblocks, batch, bo)
    return y.transpose(0, 1).reshape(-1, nb * bo)


def blockdiag_reference(x: Tensor, weight: Tensor) -> Tensor:
    """Slow: one block at a time."""
    nb, _, bi = weight.shape
    outs = [x[:, b * bi:(b + 1) * bi] @ weight[b].T for b in range(nb)]
    return torch.cat(outs, dim=-1)


#: from this many weights the pooled kernel trains faster than the plain bmm at any batch size
KERNEL_TRAIN_WEIGHTS = 1 << 18


def _kernel_default(batch: int, train: bool) -> bool:
    """The pooled kernel: in inference, and in training from 1024 rows."""
    return batch >= 1024 or not train


@register
class BlockDiagonal(StructuredLinear):
    """``nblocks`` independent blocks of about ``(out/nblocks, in/nblocks)``; ``in*out/nblocks`` params."""

    name = "blockdiag"
    # Static choice (python benchmarks/backend_grid.py, one thread, n = 384..4096): the copy-free BLAS
    # calls (deftly.kernels.blas.preferred: from 1024 rows for blocks >= 64 wide, in training from 16 rows
    # for >= 2**18 weights); else, in training below 1024 rows, the plain bmm (native) for small weights
    # (384x384 in 4 blocks, 64 rows: 0.35 vs 0.43 ms) and the pooled kernel with its hand-written backward
    # from 2**18 weights (4096x4096 in 16 blocks, 8 rows: 3.1 vs 4.4 ms); the kernel in inference.
    kernels: ClassVar[dict[str, KernelSpec]] = {
        "blas": KernelSpec(blas.blockdiag_matmul_blas, default=lambda batch, train: batch >= blas.MIN_BATCH,
                           layer_default=lambda layer, batch, train: blas.preferred(layer.weight.shape, batch, train),
                           bias=True, compile_ok=False, dtypes=(torch.float32, torch.float64),
                           available=blas.usable),
        "kernel": KernelSpec(blockdiag_matmul, default=_kernel_default, bias=True,
                             layer_default=lambda layer, batch, train: (
                                 _kernel_default(batch, train) or layer.weight.numel() >= KERNEL_TRAIN_WEIGHTS)),
        "kernel_strided": KernelSpec(blockdiag_matmul_strided, bias=True, compile_ok=False, auto=False),
        "triton": KernelSpec(blockdiag_matmul_triton, available=triton_usable, compile_ok=False),
    }

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, nblocks: int = 4,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        lim = min(in_features, out_features)
        self.nblocks = check_int("BlockDiagonal", "nblocks", nblocks, maximum=lim,
                                 fix=f"Every block needs at least one input and one output: use 1 <= "
                                     f"nblocks <= min(in_features, out_features) = {lim}.")
        self.in_part = Partition(in_features, self.nblocks)
        self.out_part = Partition(out_features, self.nblocks)
        bo, bi = self.out_part.block, self.in_part.block
        self.weight = nn.Parameter(torch.empty(self.nblocks, bo, bi, **self._factory))  # (nblocks, bo, bi)
        self.reset_parameters()

    def hparams(self) -> dict:
        return {"nblocks": self.nblocks}

    def _reset_structure(self) -> None:
        # true fan-in of a block is its true input size (padding slots see zeros)
        fan_in = self.in_features / self.nblocks
        init_uniform_(self.weight, 1.0 / (3.0 * fan_in))

    def _matmul(self, x: Tensor) -> Tensor:
        y = blockdiag_multiply(self.in_part.pad(x), self.weight)
        return self.out_part.unpad(y)

    def _kernel_args(self) -> tuple:
        ip, op = cast(Partition, self._modules["in_part"]), cast(Partition, self._modules["out_part"])
        return (self._parameters["weight"], None if ip.exact else ip.gather_index,
                None if op.exact else op.real_index)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        y = blockdiag_reference(self.in_part.pad(x), self.weight)
        return self.out_part.unpad(y)

    def to_dense(self) -> Tensor:
        full = torch.block_diag(*self.weight.unbind(0))  # (nblocks*bo, nblocks*bi)
        return full.index_select(0, self.out_part.real_index).index_select(1, self.in_part.real_index)

    def block_projector(self, cov: Tensor | None = None):
        """A function ``weight (out, in) -> blocks (nblocks, bo, bi)``: the projection of ``weight``.

        Plain: the diagonal blocks of ``W`` (block extraction is the Frobenius-nearest block-diagonal
        matrix). With ``cov``: each block's rows solve the least-squares problem on their input block,
        ``S_J = W_J + C_JJ^+ C_{J,J^c} W_{J^c}`` (the exact minimiser of ``||(W - S) C^{1/2}||``); the
        per-block operators are computed once, so repeated projections (``lrbd``) are cheap.
        Padding slots stay zero.
        """
        nb, bo, bi = self.weight.shape
        ip, op = self.in_part, self.out_part
        ops = None
        if cov is not None:
            ops = [fixed_support_operator(cov, torch.arange(ip.starts[b], ip.starts[b] + ip.sizes[b],
                                                            device=cov.device)) for b in range(nb)]

        def project(weight: Tensor) -> Tensor:
            blocks = weight.new_zeros(nb, bo, bi)
            for b in range(nb):
                o0, no = op.starts[b], op.sizes[b]
                i0, ni = ip.starts[b], ip.sizes[b]
                rows = weight[o0:o0 + no]
                if ops is None or cov is None:  # (ops is None exactly when cov is None)
                    blocks[b, :no, :ni] = rows[:, i0:i0 + ni]
                else:
                    support = torch.arange(i0, i0 + ni, device=weight.device)
                    blocks[b, :no, :ni] = fixed_support_solve(rows, cov, support, ops[b])
            return blocks

        return project

    def projected_blocks(self, weight: Tensor, cov: Tensor | None = None) -> Tensor:
        """``(nblocks, bo, bi)`` blocks of the projection of ``weight`` (see :meth:`block_projector`)."""
        return self.block_projector(cov)(weight)

    def dense_from_blocks(self, blocks: Tensor) -> Tensor:
        """The ``(out, in)`` matrix of ``blocks`` laid out as this layer does (see :meth:`to_dense`)."""
        full = torch.block_diag(*blocks.unbind(0))
        return full.index_select(0, self.out_part.real_index.to(full.device)).index_select(
            1, self.in_part.real_index.to(full.device))

    def _project_closed_form(self, weight: Tensor, cov: Tensor | None = None) -> bool:
        set_param_(self.weight, self.projected_blocks(weight, cov))
        return True

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        return [{"nblocks": b} for b in range(1, min(in_features, out_features) + 1)]

    @classmethod
    def shape_score(cls, in_features: int, out_features: int, *, nblocks: int) -> float:
        """Padding: block counts that divide both sizes first."""
        return 10.0 * ((nblocks * ceil_div(in_features, nblocks) - in_features) / in_features
                       + (nblocks * ceil_div(out_features, nblocks) - out_features) / out_features)

    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, nblocks: int) -> int:
        return nblocks * ceil_div(in_features, nblocks) * ceil_div(out_features, nblocks)

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, nblocks: int) -> int:
        return 2 * cls.param_count(in_features, out_features, nblocks=nblocks)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        lim = min(in_features, out_features)
        return [{"nblocks": min(4, lim)}, {"nblocks": lim}, {"nblocks": 1}]
