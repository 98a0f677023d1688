"""``butterfly``: log2(n) sparse factors of 2x2 blocks with the FFT's stride pattern, real or complex.

Dao, Gu, Eichhorn, Rudra, Ré, "Learning Fast Algorithms for Linear Transforms Using Butterfly
Factorizations", ICML 2019; Dao, Sohoni, Gu, Eichhorn, Blonder, Leszczynski, Rudra, Ré, "Kaleidoscope: An
Efficient, Learnable Representation For All Structured Linear Maps", ICLR 2020.

**Structure.** ``n = max(2, next power of two >= max(in, out))``, ``k = log2 n``. One butterfly is ``k``
factors; the factor of stride ``s = 2**j`` pairs the positions ``p = g*2s + t`` and ``q = p + s``
(``g < n/(2s)``, ``t < s``) through its own 2x2 block ``[[a, b], [c, d]]``: ``y_p = a x_p + b x_q``,
``y_q = c x_p + d x_q``. Block ``(g, t)`` has index ``g*s + t``. Every factor has ``n/2`` blocks; all
twiddles live in one parameter ``twiddle: (depth, k, n/2, 2, 2)`` where ``twiddle[d, j]`` is the factor of
stride ``2**j`` of butterfly ``d``.

**Order.** The input is zero-padded to ``n``, gathered through a fixed permutation ``perm`` (an index
buffer), then butterfly ``d = 0, 1, ...`` is applied; even ``d`` apply strides ``1, 2, ..., n/2`` (the
decimation-in-time order), odd ``d`` apply ``n/2, ..., 1``: ``depth = 2`` is the kaleidoscope ``B B^T``
form (the ``B^T``-shaped factor first). The output keeps the first ``out`` entries (and, with
``real_output``, their real part).

**Inits** (``init=``): ``"random"`` — i.i.d. uniform twiddles whose output variance matches
``nn.Linear``; ``"identity"``; ``"hadamard"`` — every block ``[[1, 1], [1, -1]]``: exactly Sylvester's
``H_n`` (Kronecker power of ``H_2``, no permutation); ``"fft"`` (complex) — radix-2 decimation in time:
``perm="bitrev"`` and blocks ``[[1, w^t], [1, -w^t]]``, ``w = exp(-2 pi i / 2s)``: exactly the DFT matrix
``exp(-2 pi i jk / n)``; ``"dct"`` — the orthonormal DCT-II by Makhoul (1980): with
``v = (x_0, x_2, x_4, ..., x_5, x_3, x_1)`` (``perm="dct"`` = this reordering followed by bit reversal),
``DCT(x)_k = Re(c_k exp(-i pi k / 2n) FFT(v)_k)``, ``c_0 = sqrt(1/n)``, ``c_k = sqrt(2/n)``. The diagonal
``c_k exp(-i pi k/2n)`` is folded into the rows of the last (stride ``n/2``) factor and the real part is
the ``real_output`` stage, so the DCT layer is still a plain trainable complex butterfly whose output's
real part is taken (the BP-with-real-part form Dao et al. 2019 used for real transforms).
With ``depth > 1`` the first butterfly holds the transform and the others start at the identity.
For ``in, out < n`` these inits are the ``n``-point transform of the zero-padded input, first ``out``
outputs; :mod:`deftly.transforms` builds exact transforms of any size.

**Multiply.** Batch-last ``(n, batch)``; per factor, one ``bmm`` of the ``n/2`` 2x2 blocks with their
input pairs (a reshape-transpose gathers the pairs; no loop over blocks).
FLOPs per row: ``depth * k * (n/2 blocks) * 4`` multiply-adds, x2, x4 if complex (padding included).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.base import StructuredLinear, check_int, init_uniform_
from ..core.partition import DerivedBuffers
from ..core.registry import register
from ..kernels import KernelSpec, butterfly_flops, butterfly_matmul

__all__ = [
    "Butterfly",
    "apply_stage",
    "bit_reversal",
    "butterfly_size",
    "makhoul_order",
    "radix2_twiddles",
    "stage_positions",
]

INITS = ("random", "identity", "fft", "hadamard", "dct")
PERMS = ("none", "bitrev", "dct")


# ---------------------------------------------------------------------------------------- helpers
def butterfly_size(in_features: int, out_features: int) -> int:
    """``n = max(2, next power of two >= max(in, out))``."""
    m = max(in_features, out_features, 2)
    return 1 << (m - 1).bit_length()


def bit_reversal(n: int) -> Tensor:
    """``(n,)`` long: ``r[i]`` = ``i`` with its ``log2 n`` bits reversed (``n`` a power of two)."""
    k = n.bit_length() - 1
    if n < 1 or (1 << k) != n:
        raise ValueError(f"bit_reversal: n={n} is not a power of two; pad to {1 << (n - 1).bit_length()}")
    idx = torch.arange(n)
    rev = torch.zeros(n, dtype=torch.long)
    for b in range(k):  # loop over bits, not entries
        rev |= ((idx >> b) & 1) << (k - 1 - b)
    return rev


def makhoul_order(n: int) -> Tensor:
    """``(n,)`` long: ``v = x[order]`` is Makhoul's reordering ``v[m] = x[2m]``, ``v[n-1-m] = x[2m+1]``."""
    order = torch.empty(n, dtype=torch.long)
    even = torch.arange((n + 1) // 2)
    odd = torch.arange(n // 2)
    order[even] = 2 * even
    order[n - 1 - odd] = 2 * odd + 1
    return order


def stage_positions(n: int, stride: int) -> tuple[Tensor, Tensor]:
    """Positions ``(p, q)`` (each ``(n/2,)``) paired by block ``b = g*stride + t`` of a stride factor."""
    b = torch.arange(n // 2)
    g, t = b // stride, b % stride
    p = g * 2 * stride + t
    return p, p + stride


def radix2_twiddles(n: int, sign: int = -1) -> list[Tensor]:
    """For each stride ``s = 1, 2, ..., n/2``: the ``(s,)`` complex128 twiddles ``exp(sign 2 pi i t / 2s)``.

    Angles are reduced exactly (``t / 2s`` is a dyadic rational) so every twiddle is correctly rounded.
    """
    out = []
    s = 1
    while s < n:
        ang = (sign * 2.0 * math.pi / (2 * s)) * torch.arange(s, dtype=torch.float64)
        out.append(torch.polar(torch.ones_like(ang), ang))
        s *= 2
    return out


def apply_stage(h: Tensor, tw: Tensor, stride: int) -> Tensor:
    """One butterfly factor on batch-last data: ``h (n, batch)``, ``tw (n/2, 2, 2)`` -> ``(n, batch)``.

    One ``bmm`` of the ``n/2`` 2x2 blocks (block ``g*stride + t``) with their ``(2, batch)`` input pairs;
    batch-last keeps every operand long in its last dimension whatever the stride.
    """
    n, batch = h.shape
    g = n // (2 * stride)
    pairs = h.reshape(g, 2, stride, batch).transpose(1, 2).reshape(g * stride, 2, batch)  # (n/2, 2, batch)
    y = torch.bmm(tw, pairs)  # (n/2, 2, batch), contiguous
    return y.reshape(g, stride, 2, batch).transpose(1, 2).reshape(n, batch)


@lru_cache(maxsize=256)
def _butterfly_indices(n: int, perm: str, in_features: int) -> dict[str, Tensor]:
    """The layer's CPU index buffers: ``gather_index (n,)`` (slot ``i`` of the permuted padded input reads
    ``[x, 0][gather_index[i]]``; padding slots read the appended zero column ``in_features``) and
    ``input_slot (in,)`` (the slot input feature ``c`` lands in)."""
    with torch.device("cpu"):  # values, even inside a `with torch.device("meta")` block
        src = Butterfly.perm_source(n, perm)  # (n,) padded input feeding each slot
        inverse = torch.empty_like(src)
        inverse[src] = torch.arange(n)
        return {"gather_index": src.clamp(max=in_features), "input_slot": inverse[:in_features].clone()}


# ---------------------------------------------------------------------------------------- layer
@register
class Butterfly(DerivedBuffers, StructuredLinear):
    """Product of ``depth`` butterflies of size ``n = 2^k >= max(in, out)``; ``2 n k depth`` parameters.

    Args:
        depth: number of butterflies (``2`` = kaleidoscope ``B B^T``).
        complex: complex twiddles (complex output; real inputs are cast). Default: ``True`` for
            ``init="fft"``/``"dct"``, else ``False``.
        init: ``"random"``, ``"identity"``, ``"fft"``, ``"hadamard"`` or ``"dct"`` (see module doc).
        perm: fixed input permutation, ``"none"``, ``"bitrev"`` or ``"dct"``; default from ``init``.
        real_output: output the real part (complex twiddles only); default ``True`` iff ``init="dct"``.
        init_norm: ``"backward"`` (numpy/scipy's unnormalised DFT and ``+-1`` Hadamard) or ``"ortho"``
            (scaled by ``1/sqrt(n)``); the DCT is always orthonormal. Only for ``fft``/``hadamard``/``dct``.
    """

    name = "butterfly"
    # blocked: two bmm's per butterfly, at matmul speed; training at a few rows is cheaper through the
    # elementwise factors (bench, fwd+bwd batch 1: native 1.3-3.3 ms, blocked 4-16 ms; batch 64 on par)
    kernels: ClassVar[dict[str, KernelSpec]] = {
        "kernel": KernelSpec(butterfly_matmul, default=lambda batch, train: batch >= 64 or not train,
                             compile_ok=False, flops=lambda m, batch: butterfly_flops(m.n, m.depth, m.complex, batch)),
    }
    # FlopCounterMode counts the real bmm's exactly but a complex bmm as if real (4x too few)
    flop_counter_exact = False
    # index buffers derived from (n, perm, in_features) by reset_parameters (see _derived_buffers)
    gather_index: Tensor
    input_slot: Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, depth: int = 1,
                 complex: bool | None = None, init: str = "random", perm: str | None = None,
                 real_output: bool | None = None, init_norm: str | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.depth, self.complex, self.perm, self.real_output, self.init, self.init_norm = \
            self._resolve(depth, complex, init, perm, real_output, init_norm, dtype)
        self.n = butterfly_size(in_features, out_features)
        self.log_n = self.n.bit_length() - 1
        real_dtype = dtype if dtype is not None else torch.get_default_dtype()
        if real_dtype.is_complex:
            real_dtype = real_dtype.to_real()
        tw_dtype = real_dtype.to_complex() if self.complex else real_dtype
        out_dtype = real_dtype if (self.real_output or not self.complex) else tw_dtype
        # (depth, log n, n/2, 2, 2): twiddle[d, j] = factor of stride 2**j of butterfly d
        self.twiddle = nn.Parameter(torch.empty(self.depth, self.log_n, self.n // 2, 2, 2, device=device,
                                                dtype=tw_dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=out_dtype))
        # index buffers derived from (n, perm, in_features): see _derived_buffers
        self.register_buffer("gather_index", None, persistent=False)
        self.register_buffer("input_slot", None, persistent=False)
        self._gather_needed = self.perm != "none"
        self.reset_parameters()  # also builds the index buffers, on the parameters' device

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _resolve(depth, complex, init, perm, real_output, init_norm, dtype):
        depth = check_int("Butterfly", "depth", depth,
                          fix="depth is the number of butterflies multiplied; use depth=1, or 2 for the "
                              "kaleidoscope B B^T form.")
        if not isinstance(init, str) or init not in INITS:
            raise ValueError(f"Butterfly: init={init!r} is not a known init; use one of {', '.join(INITS)}")
        if complex is None:
            complex = init in ("fft", "dct") or bool(dtype is not None and dtype.is_complex)
        if not isinstance(complex, bool):
            raise TypeError(f"Butterfly: complex={complex!r} must be True or False")
        if dtype is not None and dtype.is_complex and not complex:
            raise ValueError(f"Butterfly: dtype={dtype} is complex but complex=False; pass complex=True "
                             f"or a real dtype such as {dtype.to_real()}")
        if complex and dtype in (torch.bfloat16, torch.float16):
            raise ValueError(f"Butterfly: complex=True with dtype={dtype}: torch has no usable complex "
                             f"{dtype}; use dtype=torch.float32 (complex64 twiddles) or complex=False")
        if init in ("fft", "dct") and not complex:
            raise ValueError(f"Butterfly: init={init!r} needs complex twiddles but complex=False; pass "
                             f"complex=True (or leave complex unset), or use init='hadamard' for a real "
                             f"transform")
        if real_output is None:
            real_output = init == "dct"
        if not isinstance(real_output, bool):
            raise TypeError(f"Butterfly: real_output={real_output!r} must be True or False")
        if real_output and not complex:
            raise ValueError("Butterfly: real_output=True takes the real part of a complex butterfly but "
                             "complex=False; pass complex=True or real_output=False")
        if init == "dct" and not real_output:
            raise ValueError("Butterfly: init='dct' is the real part of a twiddled FFT (Makhoul 1980) but "
                             "real_output=False; leave real_output unset or pass real_output=True")
        default_perm = {"fft": "bitrev", "dct": "dct"}.get(init, "none")
        if perm is None:
            perm = default_perm
        if not isinstance(perm, str) or perm not in PERMS:
            raise ValueError(f"Butterfly: perm={perm!r} is not a known permutation; use one of "
                             f"{', '.join(PERMS)}")
        if perm != default_perm and init in ("fft", "dct"):
            raise ValueError(f"Butterfly: init={init!r} needs perm={default_perm!r}, got perm={perm!r}; "
                             f"leave perm unset")
        transform = init in ("fft", "hadamard", "dct")
        if init_norm is None:
            init_norm = "ortho" if init == "dct" else "backward"
        if init_norm not in ("backward", "ortho"):
            raise ValueError(f"Butterfly: init_norm={init_norm!r} is invalid; use 'backward' or 'ortho'")
        if init_norm != "backward" and not transform:
            raise ValueError(f"Butterfly: init_norm={init_norm!r} only applies to init='fft', 'hadamard' "
                             f"or 'dct', not init={init!r}; drop init_norm")
        if init == "dct" and init_norm != "ortho":
            raise ValueError("Butterfly: init='dct' is the orthonormal DCT-II, so init_norm='backward' is "
                             "not available; drop init_norm (or pass 'ortho')")
        return depth, complex, perm, real_output, init, init_norm

    def _derived_buffers(self) -> dict[str, Tensor]:
        return dict(_butterfly_indices(self.n, self.perm, self.in_features))

    @staticmethod
    def perm_source(n: int, perm: str) -> Tensor:
        """``(n,)`` long: slot ``i`` of the permuted (padded) input reads padded input ``src[i]``."""
        if perm == "none":
            return torch.arange(n)
        rev = bit_reversal(n)
        if perm == "bitrev":
            return rev
        return makhoul_order(n)[rev]  # Makhoul's reordering, then the bit reversal of the DIT FFT

    def hparams(self) -> dict[str, Any]:
        return {"depth": self.depth, "complex": self.complex, "perm": self.perm,
                "real_output": self.real_output}

    @property
    def weight_dtype(self) -> torch.dtype:
        # the twiddles, not the (possibly real) bias, decide whether real inputs are cast to complex
        return self.twiddle.dtype

    # ------------------------------------------------------------------ init
    def _reset_structure(self) -> None:
        n, k, L = self.n, self.log_n, self.depth * self.log_n
        with torch.no_grad():
            if self.init == "random":
                # each factor multiplies the expected energy by 2 var; padding leaves in/n of the input
                # energy; the full butterfly spreads it evenly over the n slots; Re() keeps half
                target = (1.0 / 3.0) * (2.0 if self.real_output else 1.0)
                gain = (target * n / self.in_features) ** (1.0 / L)
                init_uniform_(self.twiddle, gain / 2.0)
                return
            tw = torch.zeros(self.depth, k, n // 2, 2, 2, dtype=torch.complex128)
            tw[..., 0, 0] = 1.0
            tw[..., 1, 1] = 1.0  # identity everywhere
            if self.init == "hadamard":
                tw[0] = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.complex128)
            elif self.init in ("fft", "dct"):
                for j, w in enumerate(radix2_twiddles(n)):  # stride s = 2**j, block g*s + t -> w[t]
                    wt = w.repeat(n // (2 * w.numel()))  # (n/2,)
                    tw[0, j, :, 0, 0] = 1.0
                    tw[0, j, :, 0, 1] = wt
                    tw[0, j, :, 1, 0] = 1.0
                    tw[0, j, :, 1, 1] = -wt
            if self.init == "dct":
                # fold diag(c_k exp(-i pi k / 2n)) into the rows of the last factor (stride n/2)
                kk = torch.arange(n, dtype=torch.float64)
                c = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
                c[0] = math.sqrt(1.0 / n)
                diag = torch.polar(c, -math.pi * kk / (2 * n))  # (n,)
                p, q = stage_positions(n, n // 2)
                tw[0, k - 1, :, 0, :] *= diag[p].unsqueeze(-1)  # row 0 of block t writes y_t
                tw[0, k - 1, :, 1, :] *= diag[q].unsqueeze(-1)  # row 1 writes y_{t + n/2}
            elif self.init_norm == "ortho":
                tw[0] /= math.sqrt(2.0)
            self.twiddle.copy_(tw if self.complex else tw.real)

    # ------------------------------------------------------------------ multiplies
    def _strides(self, d: int) -> list[int]:
        """Factor indices ``j`` (stride ``2**j``) of butterfly ``d`` in the order they are applied."""
        order = list(range(self.log_n))
        return order if d % 2 == 0 else order[::-1]

    def _matmul(self, x: Tensor) -> Tensor:
        x = x.to(self.twiddle.dtype)
        if self._gather_needed:  # pad + permute in one gather, batch-last
            h = F.pad(x, (0, 1)).T.index_select(0, self.gather_index)  # (n, batch)
        else:
            h = F.pad(x, (0, self.n - self.in_features)).T.contiguous()  # (n, batch)
        for d in range(self.depth):
            for j in self._strides(d):
                h = apply_stage(h, self.twiddle[d, j], 1 << j)
        y = h[:self.out_features].T  # (batch, out)
        return y.real if self.real_output else y

    def _kernel_args(self) -> tuple:
        # the factor order of _strides (even butterflies ascending, odd descending) is the kernel's contract
        return (self._parameters["twiddle"], self._buffers["gather_index"], self.in_features,
                self.out_features, self.perm, self.real_output)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        # explicit loops: the permutation slot by slot, then every 2x2 block of every factor
        x = x.to(self.twiddle.dtype)
        src = self.perm_source(self.n, self.perm).tolist()
        zero = x.new_zeros(x.shape[0])
        h = [x[:, c] if c < self.in_features else zero for c in src]
        for d in range(self.depth):
            for j in self._strides(d):
                s = 1 << j
                tw = self.twiddle[d, j]
                new = list(h)
                for g in range(self.n // (2 * s)):
                    for t in range(s):
                        blk = tw[g * s + t]
                        p, q = g * 2 * s + t, g * 2 * s + t + s
                        new[p] = blk[0, 0] * h[p] + blk[0, 1] * h[q]
                        new[q] = blk[1, 0] * h[p] + blk[1, 1] * h[q]
                h = new
        y = torch.stack(h[:self.out_features], dim=-1)  # (batch, out)
        return y.real if self.real_output else y

    def factor_dense(self, d: int, j: int) -> Tensor:
        """The ``(n, n)`` matrix of factor ``j`` (stride ``2**j``) of butterfly ``d``, from its twiddles."""
        s = 1 << j
        p, q = stage_positions(self.n, s)
        p, q = p.to(self.twiddle.device), q.to(self.twiddle.device)
        tw = self.twiddle[d, j]  # (n/2, 2, 2)
        rows = torch.cat([p, p, q, q])
        cols = torch.cat([p, q, p, q])
        vals = torch.cat([tw[:, 0, 0], tw[:, 0, 1], tw[:, 1, 0], tw[:, 1, 1]])
        return self.twiddle.new_zeros(self.n, self.n).index_put((rows, cols), vals)

    def factors(self) -> list[Tensor]:
        """Every factor's dense ``(n, n)`` matrix, in the order they are applied."""
        return [self.factor_dense(d, j) for d in range(self.depth) for j in self._strides(d)]

    def to_dense(self) -> Tensor:
        W = torch.linalg.multi_dot(self.factors()[::-1]) if self.depth * self.log_n > 1 \
            else self.factors()[0]  # (n, n): last factor leftmost
        # input feature c sits in slot input_slot[c]: column c of W P is column input_slot[c] of W
        W = W[:self.out_features].index_select(1, self.input_slot)
        return W.real if self.real_output else W

    # ------------------------------------------------------------------ counts
    @classmethod
    def param_count(cls, in_features: int, out_features: int, *, depth: int = 1, complex: bool | None = None,
                    perm: str | None = None, real_output: bool | None = None, **_: Any) -> int:
        n = butterfly_size(in_features, out_features)
        return depth * (n.bit_length() - 1) * (n // 2) * 4

    @classmethod
    def flop_count(cls, in_features: int, out_features: int, *, depth: int = 1, complex: bool | None = None,
                   perm: str | None = None, real_output: bool | None = None, init: str = "random",
                   **_: Any) -> int:
        if complex is None:
            complex = init in ("fft", "dct")
        # 4 multiply-adds per 2x2 block, 2 FLOPs each; a complex multiply-add is 4 real ones
        macs = cls.param_count(in_features, out_features, depth=depth)
        return 2 * macs * (4 if complex else 1)

    @classmethod
    def examples(cls, in_features: int, out_features: int) -> list[dict]:
        return [{}, {"complex": True}, {"depth": 2},
                {"complex": True, "real_output": True, "perm": "bitrev"}]

    @classmethod
    def hparam_candidates(cls, in_features: int, out_features: int) -> list[dict]:
        # real layers only (a drop-in for a real nn.Linear); depth is the budget knob
        return [{"depth": d} for d in (1, 2, 3, 4)]
