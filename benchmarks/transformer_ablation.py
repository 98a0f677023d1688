"""Ablations for GitHub issue 13 (item 1): what limits a hand-written GPT structured with
``deftly.structurize`` and trained with ``AdamW(deftly.param_groups(model, lr))`` at dense's best lr.

One command runs the grid (or a subset) and writes ``benchmarks/results/transformer_ablation.{md,json}``::

    python benchmarks/transformer_ablation.py                    # the whole grid (resumable)
    python benchmarks/transformer_ablation.py --only 'monarch'   # arms whose name matches a regex
    python benchmarks/transformer_ablation.py --list             # arm names and settings, no training
    python benchmarks/transformer_ablation.py --show 'A/monarch' # shapes + per-factor lr multipliers only

Everything here is deliberately *outside* the library: the GPT is its own small nanoGPT-style class
(pre-LN, causal ``F.scaled_dot_product_attention``, separate ``q, k, v`` or fused ``qkv``, ``proj``, MLP
``fc1``/``fc2`` at 4x, biases on, ``nn.Linear`` default init), structure is applied from outside with
``deftly.structurize`` (the budget picker, or ``overrides`` with fixed hyperparameters for the arms
that test a shape rule) and the optimizer is ``torch.optim.AdamW(deftly.param_groups(model, lr))``
unless an arm changes exactly that. Data: the Wikipedia text of ``deftly.data.wikipedia`` (characters,
last 10% held out), val bits/char on fixed evenly spaced windows.

Resumable: an arm whose result (same settings) is already in the json is skipped; the json and md are
rewritten atomically after every arm. One thread (``torch.set_num_threads(1)``); times are CPU seconds
of this process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import deftly
from deftly.data import wikipedia

ROOT = Path(__file__).resolve().parent
OUT_JSON = ROOT / "results" / "transformer_ablation.json"
OUT_MD = ROOT / "results" / "transformer_ablation.md"
LN2 = math.log(2.0)
BUDGET = 0.25


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class GPTConfig:
    layers: int = 2
    d: int = 256
    heads: int = 4
    ctx: int = 128
    batch: int = 16
    fused_qkv: bool = False
    mlp: int = 4


MODELS = {
    # main: the hand-written GPT (2 layers, d = 256)
    "A": GPTConfig(layers=2, d=256, heads=4, ctx=64, batch=16, fused_qkv=False),
    # second GPT: other depth / width / context, fused qkv (192 -> 576), 192 = 2^6 * 3
    "B": GPTConfig(layers=3, d=192, heads=6, ctx=96, batch=12, fused_qkv=True),
}


class Attention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads, self.fused = c.heads, c.fused_qkv
        if c.fused_qkv:
            self.qkv = nn.Linear(c.d, 3 * c.d)
        else:
            self.q, self.k, self.v = nn.Linear(c.d, c.d), nn.Linear(c.d, c.d), nn.Linear(c.d, c.d)
        self.proj = nn.Linear(c.d, c.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.d, c.mlp * c.d)
        self.fc2 = nn.Linear(c.mlp * c.d, c.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.d), Attention(c)
        self.ln2, self.mlp = nn.LayerNorm(c.d), MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, c: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, c.d)
        self.pos = nn.Embedding(c.ctx, c.d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.d)
        self.head = nn.Linear(c.d, vocab)
        with torch.no_grad():
            self.tok.weight.normal_(0, 0.02)
            self.pos.weight.normal_(0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


ATTN = ["q", "k", "v", "qkv", "proj"]
MLPS = ["fc1", "fc2"]


def target_names(model: nn.Module, which: str) -> list[str]:
    suffixes = {"all": ATTN + MLPS, "attn": ATTN, "mlp": MLPS}[which]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def val_windows(ids: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    starts = np.linspace(0, len(ids) - ctx - 1, num=n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s:s + ctx + 1] for s in starts]))


@torch.no_grad()
def val_bpc(model: nn.Module, windows: torch.Tensor, bs: int = 64) -> float:
    was = model.training
    model.eval()
    tot = 0.0
    for i in range(0, len(windows), bs):
        w = windows[i:i + bs]
        tot += float(lm_loss(model, w)) * w.shape[0]
    model.train(was)
    return tot / len(windows) / LN2


def batch_fn(ids: np.ndarray, ctx: int, bs: int, seed: int):
    data = torch.from_numpy(ids)
    hi, off = len(ids) - ctx - 1, torch.arange(ctx + 1)

    def get(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return data[torch.randint(0, hi, (bs,), generator=g)[:, None] + off]

    return get


# ------------------------------------------------------------------------------------------ shape rules
def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def nearest_divisor(n: int, target: float) -> int:
    """Divisor of ``n`` nearest ``target`` in log scale (ties: the smaller)."""
    return min(divisors(n), key=lambda k: (abs(math.log(k / target)), k))


def monarch_square(i: int, o: int, budget: float, nblocks: int | None = None) -> dict:
    """``nblocks = out_blocks = b`` dividing ``gcd(in, out)`` (``b`` near ``sqrt(min(in, out))`` unless
    given: no padding, (in/b)x(out/b) blocks), rank = largest whose count fits ``budget * in * out``."""
    g = math.gcd(i, o)
    b = nblocks or nearest_divisor(g, math.sqrt(min(i, o)))
    r = int(budget * i * o // (b * b * (i // b + o // b)))
    return {"nblocks": b, "out_blocks": b, "rank": max(r, 1)}


def monarch_slices(i: int, o: int, budget: float, nblocks: int | None = None) -> dict:
    """Square (p x p) slices: ``p = min(in, out) / b``, ``nblocks = in / p``, ``out_blocks = out / p``
    (``b`` divides ``gcd(in, out)``); rank = largest in budget."""
    g = math.gcd(i, o)
    b = nblocks or nearest_divisor(g, math.sqrt(min(i, o)))
    p = min(i, o) // b
    k, l = i // p, o // p
    r = int(budget * i * o // (k * l * 2 * p))
    return {"nblocks": k, "out_blocks": l, "rank": max(r, 1)}


def blockdiag_rule(i: int, o: int, budget: float) -> dict:
    """Smallest divisor ``b`` of ``gcd(in, out)`` with ``in * out / b <= budget * in * out``."""
    g = math.gcd(i, o)
    return {"nblocks": next(k for k in divisors(g) if 1 / k <= budget + 1e-12)}


def lowrank_rule(i: int, o: int, budget: float) -> dict:
    return {"rank": int(budget * i * o // (i + o))}


def factor2(n: int) -> tuple[int, int]:
    """``(a, n / a)`` with ``a`` the divisor of ``n`` nearest ``sqrt(n)`` (a <= n / a)."""
    a = max(k for k in divisors(n) if k * k <= n)
    return a, n // a


def factor3(n: int) -> tuple[int, int, int]:
    best = None
    for a in divisors(n):
        for b in divisors(n // a):
            c = n // a // b
            key = max(a, b, c) / min(a, b, c)
            if best is None or key < best[0]:
                best = (key, tuple(sorted((a, b, c), reverse=True)))
    return best[1]


def btt_rule(i: int, o: int, budget: float, ncores: int = 2) -> dict:
    """Exact (no padding) balanced factors; the largest TT rank in budget."""
    nf = factor2(i) if ncores == 2 else factor3(i)
    mf = factor2(o) if ncores == 2 else factor3(o)
    cls = deftly.get("btt")
    best = None
    for r in range(1, 257):
        hp = {"ncores": ncores, "rank": r, "in_factors": nf, "out_factors": mf}
        if cls.param_count(i, o, **hp) > budget * i * o:
            break
        best = hp
    return best


def kron_rule(i: int, o: int, budget: float) -> dict:
    nf, mf = factor2(i), factor2(o)
    cls = deftly.get("kronecker")
    best = None
    for r in range(1, 1025):
        hp = {"in_factors": nf, "out_factors": mf, "rank": r}
        if cls.param_count(i, o, **hp) > budget * i * o:
            break
        best = hp
    return best


def fit_budget_rule(i: int, o: int, budget: float, structure: str = "monarch") -> dict:
    """The recipes' and ``structurize``'s one solver (``deftly.surgery.budget.choose_hparams``, through
    ``deftly.train.common.budget_linear``), for comparison."""
    from deftly.surgery.budget import choose_hparams

    return dict(choose_hparams(structure, i, o, budget, bias=True)[0])


def lrbd_rule(i: int, o: int, budget: float, bd_share: float = 0.5) -> dict:
    """Block-diagonal part: divisor ``b`` of gcd with ``1/b`` nearest ``bd_share * budget``; low-rank: the rest."""
    g = math.gcd(i, o)
    b = min(divisors(g), key=lambda k: (abs(math.log((1 / k) / (bd_share * budget))), k))
    r = int((budget * i * o - i * o // b) // (i + o))
    return {"rank": max(r, 1), "nblocks": b}


RULES = {
    "monarch_square": monarch_square,
    "monarch_slices": monarch_slices,
    "blockdiag": blockdiag_rule,
    "lowrank": lowrank_rule,
    "btt": btt_rule,
    "kronecker": kron_rule,
    "lrbd": lrbd_rule,
    "fit_budget": fit_budget_rule,
}


# ------------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    name: str
    model: str = "A"
    structure: str = "dense"
    # "picker": structurize(budget=0.25) chooses; "rule:<RULES key>[:kw=v,...]": our rule per layer
    shapes: str = "picker"
    targets: str = "all"  # all | attn | mlp
    attn_structure: str | None = None  # another structure (rule) for the attention layers
    attn_shapes: str | None = None
    lr: float | None = None  # None: dense's best lr on this model (from the dense sweep)
    lr_mode: str = "mup"  # mup (param_groups uncapped: max_multiplier=None) | uniform | cap<c> (cap 2: the default) | sqrt
    init: str = "default"  # default | cbs | zero | cbs+zero
    steps: int = 600
    seed: int = 0
    beta2: float = 0.999  # AdamW's default, as in the user's `AdamW(deftly.param_groups(model, lr))`
    note: str = ""

    def key(self) -> str:
        d = asdict(self)
        d.pop("note")
        d["_model"] = asdict(MODELS[self.model])
        d["_schedule"] = [WARMUP, DECAY, FINAL, BUDGET]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def parse_rule(spec: str) -> tuple[Any, dict]:
    parts = spec.split(":")
    assert parts[0] == "rule", spec
    fn = RULES[parts[1]]
    kw = {}
    for p in parts[2:]:
        k, v = p.split("=")
        kw[k] = float(v) if "." in v else int(v)
    return fn, kw


STEPS = 600  # one dense arm of model A: ~100 CPU-s on one thread (~170 ms/step)


def grid() -> list[Arm]:
    """The arms, most informative first (a partial run is still useful)."""
    S, sq = STEPS, "rule:monarch_square"
    b8, b16 = sq + ":nblocks=8", sq + ":nblocks=16"
    M = dict(structure="monarch", steps=S)
    arms = [
        # dense lr sweep (the structured arms use the best of these)
        Arm("A/dense lr1e-3", lr=1e-3, steps=S), Arm("A/dense lr2e-3", lr=2e-3, steps=S),
        Arm("A/dense lr5e-4", lr=5e-4, steps=S),
        # --- the setting: picker shapes + default param_groups, vs square blocks
        Arm("A/monarch picker", **M),
        Arm("A/monarch sq b8", shapes=b8, **M),
        # --- is it the multipliers or the shapes?
        Arm("A/monarch picker cap1", lr_mode="cap1", **M),
        Arm("A/monarch sq b8 uniform", shapes=b8, lr_mode="uniform", **M),
        Arm("A/monarch sq b16", shapes=b16, **M),
        # --- other structures: the picker's shapes vs divisor / budget rules
        Arm("A/blockdiag picker", structure="blockdiag", steps=S),
        Arm("A/blockdiag b4", structure="blockdiag", shapes="rule:blockdiag", steps=S),
        Arm("A/lowrank", structure="lowrank", shapes="rule:lowrank", steps=S),
        Arm("A/lowrank uniform", structure="lowrank", shapes="rule:lowrank", lr_mode="uniform", steps=S),
        # --- multipliers: caps / square root on the square shape
        Arm("A/monarch sq b8 cap2", shapes=b8, lr_mode="cap2", **M),
        Arm("A/monarch sq b8 cap1", shapes=b8, lr_mode="cap1", **M),
        Arm("A/monarch sq b8 cap4", shapes=b8, lr_mode="cap4", **M),
        Arm("A/monarch picker cap2", lr_mode="cap2", **M),
        Arm("A/lowrank cap2", structure="lowrank", shapes="rule:lowrank", lr_mode="cap2", steps=S),
        Arm("A/blockdiag b4 cap2", structure="blockdiag", shapes="rule:blockdiag", lr_mode="cap2", steps=S),
        Arm("A/blockdiag b4 cap1", structure="blockdiag", shapes="rule:blockdiag", lr_mode="cap1", steps=S),
        Arm("A/lowrank cap1", structure="lowrank", shapes="rule:lowrank", lr_mode="cap1", steps=S),
        Arm("A/monarch sq b8 sqrt", shapes=b8, lr_mode="sqrt", **M),
        # --- rank vs blocks at the same budget (nblocks * rank = 32 on 256x256); rectangular forms
        Arm("A/monarch sq b4", shapes=sq + ":nblocks=4", **M),
        Arm("A/monarch sq b32", shapes=sq + ":nblocks=32", **M),
        Arm("A/monarch square slices b8", shapes="rule:monarch_slices:nblocks=8", **M),
        Arm("A/monarch recipe fit_budget", shapes="rule:fit_budget", **M),
        # --- init
        Arm("A/monarch sq b8 cbs-init", shapes=b8, init="cbs", **M),
        Arm("A/dense cbs-init", init="cbs", steps=S),
        Arm("A/monarch sq b8 zero-last", shapes=b8, init="zero", **M),
        Arm("A/dense zero-last", init="zero", steps=S),
        # --- attention vs MLP
        Arm("A/monarch sq b8 mlp only", shapes=b8, targets="mlp", **M),
        Arm("A/monarch sq b8 attn only", shapes=b8, targets="attn", **M),
        Arm("A/lowrank attn + monarch mlp", shapes=b8, attn_structure="lowrank", attn_shapes="rule:lowrank", **M),
        # --- BTT, low-rank + block-diagonal (+ identity), Kronecker
        Arm("A/btt picker", structure="btt", steps=S),
        Arm("A/btt 2 cores", structure="btt", shapes="rule:btt", steps=S),
        Arm("A/lrbd picker", structure="lrbd", steps=S),
        Arm("A/lrbd rule", structure="lrbd", shapes="rule:lrbd", steps=S),
        Arm("A/lrbd rule no identity", structure="lrbd", shapes="rule:lrbd", init="noid", steps=S),
        Arm("A/blockdiag b4 uniform", structure="blockdiag", shapes="rule:blockdiag", lr_mode="uniform", steps=S),
        Arm("A/monarch picker uniform", lr_mode="uniform", **M),
        Arm("A/kronecker picker", structure="kronecker", steps=S),
        # --- seed noise
        Arm("A/dense seed1", seed=1, steps=S),
        Arm("A/monarch sq b8 seed1", shapes=b8, seed=1, **M),
        # --- optimizer: AdamW beta2 = 0.95 (nanoGPT's) instead of the default 0.999 (first runs of this grid)
        Arm("A/dense lr1e-3 beta2=.95", lr=1e-3, beta2=0.95, steps=S),
        Arm("A/dense lr2e-3 beta2=.95", lr=2e-3, beta2=0.95, steps=S),
        Arm("A/dense lr5e-4 beta2=.95", lr=5e-4, beta2=0.95, steps=S),
        Arm("A/monarch picker beta2=.95", beta2=0.95, **M),
        Arm("A/monarch sq b8 beta2=.95", shapes=b8, beta2=0.95, **M),
    ]
    # --- longer runs (2.5x) of the decisive comparisons: gaps at 600 steps are within the seed spread
    L = 1500
    arms += [
        Arm("A/dense lr1e-3 long", lr=1e-3, steps=L),
        Arm("A/monarch picker long", structure="monarch", steps=L),
        Arm("A/monarch picker cap2 long", structure="monarch", lr_mode="cap2", steps=L),
        Arm("A/monarch sq b16 cap2 long", structure="monarch", shapes=b16, lr_mode="cap2", steps=L),
        Arm("A/monarch sq b8 cap2 long", structure="monarch", shapes=b8, lr_mode="cap2", steps=L),
        Arm("A/monarch sq b8 long", structure="monarch", shapes=b8, steps=L),
    ]
    # --- second GPT: 3 layers, d = 192, context 96, fused qkv
    arms += [
        Arm("B/dense lr1e-3", model="B", lr=1e-3, steps=S), Arm("B/dense lr2e-3", model="B", lr=2e-3, steps=S),
        Arm("B/dense lr5e-4", model="B", lr=5e-4, steps=S),
        Arm("B/monarch picker", model="B", **M),
        Arm("B/monarch picker cap2", model="B", lr_mode="cap2", **M),
        Arm("B/monarch sq rule cap2", model="B", shapes=sq, lr_mode="cap2", **M),
        Arm("B/lowrank cap2", model="B", structure="lowrank", shapes="rule:lowrank", lr_mode="cap2", steps=S),
        Arm("B/monarch sq rule", model="B", shapes=sq, **M),
        Arm("B/blockdiag picker", model="B", structure="blockdiag", steps=S),
        Arm("B/blockdiag rule", model="B", structure="blockdiag", shapes="rule:blockdiag", steps=S),
        Arm("B/lowrank", model="B", structure="lowrank", shapes="rule:lowrank", steps=S),
    ]
    return [a for n in ORDER for a in arms if a.name == n] + [a for a in arms if a.name not in ORDER]


# run order (most informative first; the wall-clock on a shared 2-core machine is ~6x the CPU time)
ORDER = ["A/dense lr1e-3", "A/dense lr2e-3", "A/dense lr5e-4", "A/monarch picker", "A/monarch sq b8",
         "A/dense seed1", "A/monarch sq b8 seed1", "A/monarch picker cap1", "A/monarch sq b8 uniform",
         "A/monarch sq b16", "A/blockdiag b4", "A/blockdiag picker", "A/lowrank", "A/monarch sq b8 cap1",
         "A/blockdiag b4 cap1", "A/lowrank cap1", "A/monarch sq b8 cap2",
         "A/monarch sq b4", "A/monarch sq b8 cap4", "A/monarch picker cap2", "A/monarch sq b32",
         "A/monarch square slices b8",
         "A/dense lr1e-3 long", "A/monarch picker long", "A/monarch picker cap2 long", "A/monarch sq b16 cap2 long",
         "A/monarch sq b8 cap2 long",
         "A/lowrank cap2", "A/monarch sq b8 mlp only", "A/monarch sq b8 attn only", "A/lowrank attn + monarch mlp",
         "B/dense lr1e-3", "B/dense lr2e-3", "B/dense lr5e-4", "B/monarch picker", "B/monarch picker cap2",
         "B/monarch sq rule cap2", "B/lowrank cap2",
         "A/monarch sq b8 cbs-init", "A/dense cbs-init", "A/monarch sq b8 zero-last", "A/dense zero-last",
         "A/monarch sq b8 long"]


# ---------------------------------------------------------------------------------------------- surgery
def _hp_for(spec: str, i: int, o: int) -> dict:
    fn, kw = parse_rule(spec)
    return fn(i, o, BUDGET, **kw)


def apply_structure(model: nn.Module, arm: Arm) -> dict[str, Any]:
    """Structure ``model`` in place with ``deftly.structurize``; return the report's per-layer rows."""
    if arm.structure == "dense":
        return {}
    names = target_names(model, arm.targets)
    mods = dict(model.named_modules())
    overrides: dict[str, dict] = {}
    attn_names = set(target_names(model, "attn"))
    for n in names:
        lin = mods[n]
        i, o = lin.in_features, lin.out_features
        if arm.attn_structure and n in attn_names:
            ov = {"structure": arm.attn_structure}
            if arm.attn_shapes and arm.attn_shapes != "picker":
                ov.update(_hp_for(arm.attn_shapes, i, o))
            overrides[re.escape(n)] = ov
        elif arm.shapes != "picker":
            overrides[re.escape(n)] = _hp_for(arm.shapes, i, o)
    cfg = deftly.StructureConfig(structure=arm.structure, target_modules=names, budget=BUDGET, init="random",
                                 overrides=overrides, seed=arm.seed)
    rep = deftly.structurize(model, cfg)
    return {r.name: {"structure": r.structure, "hparams": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in r.hparams.items()},
                     "in": r.in_features, "out": r.out_features, "params": r.params_after}
            for r in rep.layers}


OUTPUT_FACTOR = {"monarch": ["L"], "lowrank": ["U"], "blockdiag": ["weight"], "kronecker": ["A"],
                 "lrbd": ["lowrank.U", "blockdiag.weight"], "dense": ["weight"]}


def _out_factor(layer: nn.Module) -> list[str]:
    if isinstance(layer, nn.Linear):
        return ["weight"]
    name = layer.name
    if name == "btt":
        return [f"core{layer.ncores}"]
    return OUTPUT_FACTOR.get(name, [])


def apply_init(model: nn.Module, arm: Arm) -> None:
    modes = set(arm.init.split("+")) - {"default"}
    names = target_names_all(model)
    if "cbs" in modes:  # Compute Better Spent: std = 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))
        with torch.no_grad():
            for _n, m in names:
                for pn, p in m.named_parameters():
                    if pn.endswith("bias"):
                        continue
                    fi, fo = p.shape[-1], p.shape[-2]
                    p.normal_(0, (1 / math.sqrt(fi)) * min(1.0, math.sqrt(fo / fi)))
    if "noid" in modes:  # drop lrbd's fixed identity term (the residual inside the layer)
        for _, m in names:
            if getattr(m, "has_fixed_residual", False):
                m.fixed_residual = lambda x, m=m: x.new_zeros(*x.shape[:-1], m.out_features)
    if "zero" in modes:  # last layer of each residual branch: zero its output-side factor
        with torch.no_grad():
            for n, m in names:
                if n.rsplit(".", 1)[-1] in ("proj", "fc2"):
                    for pn in _out_factor(m):
                        m.get_parameter(pn).zero_()


def target_names_all(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every projection of the blocks (dense or structured), top-level modules only."""
    out = []
    for n, m in model.named_modules():
        if n.rsplit(".", 1)[-1] in ATTN + MLPS and (isinstance(m, nn.Linear) or hasattr(m, "hparams")):
            out.append((n, m))
    return out


def make_groups(model: nn.Module, arm: Arm, lr: float) -> list[dict]:
    mode = arm.lr_mode
    if mode == "uniform":
        return [{"params": list(model.parameters()), "lr": lr, "lr_mult": 1.0,
                 "names": [n for n, _ in model.named_parameters()]}]
    cap = float(mode[3:]) if mode.startswith("cap") else None
    groups = deftly.param_groups(model, lr, max_multiplier=cap)
    if mode == "sqrt":
        for g in groups:
            g["lr_mult"] = math.sqrt(g["lr_mult"])
            g["lr"] = lr * g["lr_mult"]
    return groups


# ---------------------------------------------------------------------------------------------- running
_DATA: dict[str, Any] = {}


def data():
    if not _DATA:
        tr, va, vocab = wikipedia.char_splits()
        _DATA.update(train=tr, val=va, vocab=len(vocab))
    return _DATA


def build(arm: Arm) -> tuple[nn.Module, dict]:
    c = MODELS[arm.model]
    torch.manual_seed(arm.seed)
    model = GPT(data()["vocab"], c)
    layers = apply_structure(model, arm)
    torch.manual_seed(arm.seed + 12345)
    apply_init(model, arm)
    return model, layers


def linear_weight_count(model: nn.Module) -> int:
    tot = 0
    for _, m in target_names_all(model):
        tot += sum(p.numel() for pn, p in m.named_parameters() if not pn.endswith("bias"))
    return tot


def dense_linear_count(c: GPTConfig) -> int:
    qkv = 3 * c.d * c.d
    return c.layers * (qkv + c.d * c.d + 2 * c.mlp * c.d * c.d)


def multipliers(groups: list[dict]) -> dict[str, float]:
    """Per (kind, factor) multiplier from layer 0 of the groups."""
    out = {}
    for g in groups:
        for n in g["names"]:
            if n.startswith("blocks.0.") and not n.endswith("bias") and ("attn" in n or "mlp" in n):
                short = n.replace("blocks.0.", "").replace("attn.", "").replace("mlp.", "")
                out[short] = round(float(g["lr_mult"]), 3)
    return dict(sorted(out.items()))


def _dense_ref(r: dict, model: str, steps: int, beta2: float) -> bool:
    a = r["arm"]
    return (a["model"] == model and a["structure"] == "dense" and a["init"] == "default" and a["seed"] == 0
            and a["steps"] == steps and a["lr"] is not None and a["lr_mode"] == "mup"
            and a.get("beta2", 0.999) == beta2)


def best_dense_lr(results: dict, model: str, steps: int, beta2: float = 0.999) -> float | None:
    cands = [r for r in results.values() if _dense_ref(r, model, steps, beta2)]
    if not cands:
        return None
    return min(cands, key=lambda r: r["final_bpc"])["arm"]["lr"]


WARMUP, DECAY, FINAL = 50, 0.2, 0.1  # schedule: linear warm-up, constant, linear decay to 10% over the last 20%


def lr_factor(step: int, steps: int) -> float:
    """Warm-up / stable / decay ("WSD"): constant lr in the middle (fast exit from the bigram plateau),
    a short decay at the end (a clean final number)."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    start = int(steps * (1 - DECAY))
    if step < start:
        return 1.0
    return 1.0 - (1.0 - FINAL) * (step - start + 1) / max(1, steps - start)


def run_arm(arm: Arm, lr: float, eval_every: int = 100, eval_windows: int = 256) -> dict[str, Any]:
    c = MODELS[arm.model]
    d = data()
    model, layers = build(arm)
    groups = make_groups(model, arm, lr)
    for g in groups:
        g.setdefault("weight_decay", 0.0)
        g["weight_decay"] = 0.0
    mults = multipliers(groups)
    # the user's call: torch.optim.AdamW(deftly.param_groups(model, lr)) -- default betas (0.9, 0.999);
    # param_groups sets weight_decay 0 in every group
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr,
                            betas=(0.9, arm.beta2))
    base = [g["lr"] for g in opt.param_groups]
    windows = val_windows(d["val"], c.ctx, eval_windows)
    get = batch_fn(d["train"], c.ctx, c.batch, arm.seed)
    hist, losses = [], []
    t0 = time.process_time()
    step_times = []
    bpc0 = val_bpc(model, windows)
    hist.append({"step": 0, "val_bpc": round(bpc0, 4), "cpu_s": 0.0})
    train_cpu = 0.0
    for step in range(arm.steps):
        s0 = time.process_time()
        f = lr_factor(step, arm.steps)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        loss = lm_loss(model, get(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.process_time() - s0
        train_cpu += dt
        step_times.append(dt)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % eval_every == 0 or step + 1 == arm.steps:
            hist.append({"step": step + 1, "val_bpc": round(val_bpc(model, windows), 4),
                         "train_bpc": round(float(np.mean(losses[-50:])) / LN2, 4), "cpu_s": round(train_cpu, 1)})
            print(f"  {arm.name}: step {step + 1} val {hist[-1]['val_bpc']:.4f} train {hist[-1]['train_bpc']:.4f}"
                  f" ({train_cpu:.0f} s)", flush=True)
    lw = linear_weight_count(model)
    return {"arm": asdict(arm), "key": arm.key(), "lr": lr, "final_bpc": hist[-1]["val_bpc"], "history": hist,
            "linear_weights": lw, "linear_fraction": round(lw / dense_linear_count(c), 4),
            "layers": layers, "multipliers": mults, "train_cpu_s": round(train_cpu, 1),
            "median_step_ms": round(1000 * float(np.median(step_times)), 1),
            "total_cpu_s": round(time.process_time() - t0, 1), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------- output
def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _short_hp(layers: dict) -> str:
    """Distinct hparams by layer kind (layer 0)."""
    seen = {}
    for n, r in layers.items():
        if not n.startswith("blocks.0."):
            continue
        kind = n.rsplit(".", 1)[-1]
        hp = ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in r["hparams"].items())
        seen.setdefault(f"{r['structure']}[{hp}]", []).append(kind)
    return "; ".join(f"{'/'.join(v)}: {k}" for k, v in seen.items()) or "-"


def write_outputs(results: dict) -> None:
    atomic_write(OUT_JSON, json.dumps(results, indent=1, sort_keys=True))
    order = {a.name: i for i, a in enumerate(grid())}
    rows = sorted(results.values(), key=lambda r: (r["arm"]["model"], order.get(r["arm"]["name"], 999)))
    lines = ["# Transformer ablation (issue 13): val bits/char at equal steps", "",
             "Generated by `python benchmarks/transformer_ablation.py`; see docs/defaults.md.", "",
             "| arm | model | steps | lr | beta2 | lr mode | init | linear weights (of dense) | val bpc | vs best dense | "
             "step ms | shapes (layer 0) | multipliers (layer 0) |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        a = r["arm"]
        b2 = a.get("beta2", 0.999)
        best = best_dense_lr(results, a["model"], a["steps"], b2)
        ref = [x for x in results.values() if _dense_ref(x, a["model"], a["steps"], b2) and x["arm"]["lr"] == best]
        gap = f"{100 * (r['final_bpc'] / ref[0]['final_bpc'] - 1):+.1f}%" if ref else "-"
        mult = ", ".join(f"{k}={v:g}" for k, v in r["multipliers"].items() if v != 1.0) or "all 1"
        lines.append(f"| {a['name']} | {a['model']} | {a['steps']} | {r['lr']:g} | {b2:g} | {a['lr_mode']} | {a['init']} | "
                     f"{r['linear_weights']:,} ({r['linear_fraction']:.3f}) | {r['final_bpc']:.4f} | {gap} | "
                     f"{r['median_step_ms']:.0f} | {_short_hp(r['layers'])} | {mult} |")
    lines += ["", "Curves (val bpc at each evaluation):", ""]
    for r in rows:
        lines.append(f"- {r['arm']['name']}: " + ", ".join(f"{h['step']}: {h['val_bpc']:.3f}" for h in r["history"]))
    atomic_write(OUT_MD, "\n".join(lines) + "\n")


def load() -> dict:
    if OUT_JSON.exists():
        return json.loads(OUT_JSON.read_text())
    return {}


def show(arm: Arm) -> None:
    model, layers = build(arm)
    groups = make_groups(model, arm, 1e-3)
    lw = linear_weight_count(model)
    print(f"{arm.name}: linear weights {lw:,} = {lw / dense_linear_count(MODELS[arm.model]):.4f} of dense")
    print("  shapes:", _short_hp(layers))
    print("  multipliers:", multipliers(groups))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="regex: run the arms whose name matches (re.search)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--show", default=None, help="regex: print shapes and multipliers of matching arms")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the md from the json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    arms = grid()
    if args.only:
        arms = [a for a in arms if re.search(args.only, a.name)]
    if args.list:
        for a in arms:
            print(a.name, {k: v for k, v in asdict(a).items() if k != "name"})
        return
    if args.show:
        for a in grid():
            if re.search(args.show, a.name):
                show(a)
        return
    results = load()
    if args.rewrite:
        write_outputs(results)
        return
    for arm in arms:
        if arm.name in results and results[arm.name]["key"] == arm.key():
            print(f"skip {arm.name} (done: {results[arm.name]['final_bpc']:.4f})")
            continue
        lr = arm.lr if arm.lr is not None else best_dense_lr(results, arm.model, arm.steps, arm.beta2)
        if lr is None:
            print(f"skip {arm.name}: no dense lr sweep for model {arm.model} at {arm.steps} steps yet", file=sys.stderr)
            continue
        print(f"run {arm.name} (lr {lr:g})", flush=True)
        res = run_arm(arm, lr)
        results = load()  # another process may have written meanwhile
        results[arm.name] = res
        write_outputs(results)
        print(f"done {arm.name}: {res['final_bpc']:.4f} in {res['train_cpu_s']:.0f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
