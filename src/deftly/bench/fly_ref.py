"""A baseline for the Monarch rows: the published two-``bmm`` Monarch multiply as plain torch ops.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022
(arXiv 2204.00595), Section 3 and the ``blockdiag_butterfly_multiply`` algorithm of its code release
(HazyResearch/fly). Written here from the paper's description, not copied: two batched matmuls around
the reshape-transpose permutation, backward by autograd.

Shape contract (``k * p = n``, ``l * r = k * q``, ``m = l * s``):

* ``x (B, n)`` -> ``(B, k, p)`` -> ``(k, B, p)``; ``bmm`` with ``w1^T``, ``w1 (k, q, p)`` -> ``(k, B, q)``;
* the permutation: feature ``(i, u)`` of the ``k * q`` (flat index ``i * q + u``) is read as ``(t, j)``
  with ``t * l + j`` -> ``(l, B, r)``: block ``j`` of the second factor sees ``r`` features;
* ``bmm`` with ``w2^T``, ``w2 (l, s, r)`` -> ``(l, B, s)`` -> output index ``s' * l + j`` -> ``(B, m)``.

With ``q = l`` and ``r = k`` this is deftly's rank-1 ``monarch``: ``w1 = R``, ``w2 = L`` (tests/test_fly_ref.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fly_monarch_multiply(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``x (B, n)``, ``w1 (k, q, p)``, ``w2 (l, s, r)`` -> ``(B, l * s)``; see the module docstring."""
    batch, n = x.shape
    k, q, p = w1.shape
    l, s, r = w2.shape
    if k * p != n or l * r != k * q:
        raise ValueError(f"fly monarch: need k*p = n and l*r = k*q, got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    h = torch.bmm(x.reshape(batch, k, p).transpose(0, 1), w1.transpose(1, 2))  # (k, B, q)
    # flat feature i*q + u read as (t, j) = divmod(., l), then grouped by j: (l, B, r)
    h = h.transpose(0, 1).reshape(batch, r, l).permute(2, 0, 1).contiguous()
    y = torch.bmm(h, w2.transpose(1, 2))  # (l, B, s)
    return y.permute(1, 2, 0).reshape(batch, s * l)  # (B, s, l): index s' * l + j


class FlyMonarch(nn.Module):
    """The fly baseline as a layer: ``fly_monarch_multiply(x, w1, w2) + bias`` for ``in_f -> out_f`` with
    ``nblocks`` input blocks, ``out_blocks`` output blocks (rank 1), like ``deftly.make("monarch", ...,
    nblocks=nblocks, out_blocks=out_blocks, rank=1)``. The blocks must divide the sizes (no padding)."""

    def __init__(self, in_f: int, out_f: int, nblocks: int, out_blocks: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        k, l = nblocks, out_blocks
        if in_f % k or out_f % l:
            raise ValueError(f"fly monarch needs nblocks | in and out_blocks | out, got {in_f}x{out_f} "
                             f"with {k}, {l} blocks")
        self.in_features, self.out_features, self.nblocks, self.out_blocks = in_f, out_f, k, l
        p, s = in_f // k, out_f // l
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(k, l, p, generator=g, dtype=dtype) / math.sqrt(p))  # (k, q=l, p)
        self.w2 = nn.Parameter(torch.randn(l, s, k, generator=g, dtype=dtype) / math.sqrt(k))  # (l, s, r=k)
        self.bias = nn.Parameter(torch.zeros(out_f, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return fly_monarch_multiply(x, self.w1, self.w2) + self.bias

    def flops(self, batch: int = 1) -> int:
        """2 x multiply-adds of the two ``bmm``s (bias adds not counted, as for deftly's layers)."""
        return batch * 2 * (self.w1.numel() + self.w2.numel())

    def hparams(self) -> dict:
        return {"nblocks": self.nblocks, "out_blocks": self.out_blocks, "rank": 1}
