"""Splitting a feature axis into equal blocks for any size: balanced partitions and factorisations.

Block structures (block-diagonal, Monarch, BTT, ...) need ``n = nblocks * block``. deftly accepts any
``n`` by padding *inside* the layer: :class:`Partition` splits ``n`` features into ``nblocks`` contiguous
blocks whose true sizes differ by at most one, and pads each short block by one zero slot, so no block
is ever all padding. The padding is a gather through a small index buffer (never a dense permutation
matrix) and is skipped entirely when ``nblocks`` divides ``n``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DerivedBuffers", "Partition", "balanced_factors", "ceil_div", "sync_derived_buffers"]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class DerivedBuffers(nn.Module):
    """A module whose buffers named by :meth:`_derived_buffers` are functions of its sizes.

    Subclasses return ``{name: CPU tensor or None}`` from ``_derived_buffers()`` (cache the values by
    size: they are rebuilt often) and register the same names as non-persistent buffers. The values are
    re-derived after every ``_apply`` (so ``to_empty(device=...)`` never leaves uninitialised memory
    behind) and by :meth:`rebuild_derived_buffers` (``reset_parameters``, ``load_state_dict``).
    """

    def _derived_buffers(self) -> Mapping[str, Tensor | None]:
        raise NotImplementedError

    def rebuild_derived_buffers(self, device: torch.device | str | None = None) -> None:
        """Re-derive the buffers on ``device`` (default: where each buffer is now); meta stays meta."""
        for name, value in self._derived_buffers().items():
            if value is None:
                self._buffers[name] = None
                continue
            cur = self._buffers.get(name)
            dev = torch.device(device) if device is not None else (
                cur.device if cur is not None else torch.device("cpu"))
            if dev.type == "meta":
                self._buffers[name] = torch.empty(value.shape, dtype=value.dtype, device=dev)
            else:  # a private copy: the cached CPU value is shared between modules of the same sizes
                self._buffers[name] = value.to(dev, copy=True)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self.rebuild_derived_buffers()
        return out


def sync_derived_buffers(module: nn.Module) -> None:
    """Rebuild every :class:`DerivedBuffers` in ``module`` on the device of ``module``'s parameters
    (where it has any; otherwise where the buffers are)."""
    device = next((p.device for p in module.parameters()), None)
    for m in module.modules():
        if isinstance(m, DerivedBuffers):
            m.rebuild_derived_buffers(device)


@lru_cache(maxsize=1024)
def _partition_indices(n: int, nblocks: int) -> tuple[Tensor, Tensor]:
    """``(real_index (n,), gather_index (nblocks * block,))`` on the CPU (see :class:`Partition`)."""
    q, r = divmod(n, nblocks)
    block = q + (1 if r else 0)
    sizes = [q + 1] * r + [q] * (nblocks - r)
    real = [b * block + s for b in range(nblocks) for s in range(sizes[b])]
    gather = [n] * (nblocks * block)  # slot -> feature, n means "the zero column"
    for f, slot in enumerate(real):
        gather[slot] = f
    return (torch.tensor(real, dtype=torch.long, device="cpu"),
            torch.tensor(gather, dtype=torch.long, device="cpu"))


class Partition(DerivedBuffers):
    """``n`` features as ``nblocks`` contiguous blocks padded to a common size ``block``.

    ``pad``: ``(*, n) -> (*, nblocks * block)``; ``unpad``: the inverse selection. ``real_index`` gives,
    for each true feature, its slot in the padded layout (``arange(n)`` when ``nblocks`` divides ``n``).
    Both index buffers are derived from ``(n, nblocks)`` (:class:`DerivedBuffers`); ``device``: where to
    put them (``"meta"``: shapes only).
    """

    real_index: Tensor
    gather_index: Tensor

    def __init__(self, n: int, nblocks: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if nblocks > n:
            raise ValueError(f"cannot split {n} features into nblocks={nblocks} blocks; use nblocks <= {n}")
        q, r = divmod(n, nblocks)
        self.n = n
        self.nblocks = nblocks
        self.block = q + (1 if r else 0)
        self.padded = self.nblocks * self.block
        self.exact = r == 0
        #: true size and first feature of each block
        self.sizes = [q + 1] * r + [q] * (nblocks - r)
        self.starts = [0, *itertools.accumulate(self.sizes[:-1])]
        self.register_buffer("real_index", None, persistent=False)
        self.register_buffer("gather_index", None, persistent=False)
        self.rebuild_derived_buffers(device)

    def _derived_buffers(self) -> dict[str, Tensor]:
        real, gather = _partition_indices(self.n, self.nblocks)
        return {"real_index": real, "gather_index": gather}

    def pad(self, x: Tensor) -> Tensor:
        """``(*, n) -> (*, nblocks * block)`` with zeros in the padding slots."""
        if self.exact:
            return x
        return F.pad(x, (0, 1)).index_select(-1, self.gather_index)

    def unpad(self, y: Tensor) -> Tensor:
        """``(*, nblocks * block) -> (*, n)``: keep the true features."""
        if self.exact:
            return y
        return y.index_select(-1, self.real_index)

    def extra_repr(self) -> str:
        return f"n={self.n}, nblocks={self.nblocks}, block={self.block}, padded={self.padded}"


def _divisors(n: int) -> list[int]:
    small = [f for f in range(1, math.isqrt(n) + 1) if n % f == 0]
    return sorted(set(small + [n // f for f in small]))


def _best_split(n: int, d: int) -> tuple[int, ...]:
    """Exact factorisation of n into d factors (descending) minimising their sum."""
    if d == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    for a in _divisors(n):
        rest = _best_split(n // a, d - 1) if d > 2 else (n // a,)
        cand = tuple(sorted((a, *rest), reverse=True))
        if best is None or sum(cand) < sum(best):
            best = cand
    assert best is not None
    return best


@lru_cache(maxsize=4096)
def balanced_factors(n: int, d: int, window: int = 256) -> tuple[int, ...]:
    """Factors ``(n_1, ..., n_d)``, descending, with product ``>= n`` and a small sum (the cost per
    feature of a d-factor structured multiply).

    The exact factorisation is kept when its sum is within 15% of the ideal ``d * n**(1/d)``; otherwise
    (primes, e.g. ``1031 -> 43 x 24``) the smallest padded size in the next ``window`` sizes that reaches
    that bound, or the cheapest one seen.
    """
    if d < 1 or n < 1:
        raise ValueError(f"balanced_factors needs n >= 1 and d >= 1, got n={n}, d={d}")
    ideal = d * n ** (1.0 / d)
    best: tuple[int, ...] | None = None
    best_cost = math.inf
    for m in range(n, n + window):
        cand = _best_split(m, d)
        if sum(cand) <= 1.15 * ideal + 1:
            return cand
        cost = m * sum(cand)
        if cost < best_cost:
            best, best_cost = cand, cost
    assert best is not None
    return best
