#!/usr/bin/env python
"""What a structurized MiniLM *could* cost: the issue-14 model-level experiment behind docs/speed_e2e.md.

all-MiniLM-L6-v2, encoder linear layers at ``--budget`` (25%), random structured weights, real Wikipedia
text at 128 tokens, ``torch.inference_mode()``. Variants, all interleaved round by round in one process
(every round calls every variant once, the order reversed every other round):

* ``dense``                    the original model (``nn.Linear``);
* ``deftly-dense``             deftly's own ``dense`` structure in every encoder layer (deftly's per-call
                               overhead alone: same FLOPs as dense);
* ``<s>``                      ``deftly.structurize(..., budget=b)`` as it is today;
* ``<s> fast``                 the same weights, each layer's ``forward`` replaced (monkeypatched, this
                               script only) by the fewest-op multiply: no input checks, no dispatch, no
                               padding when the blocks divide the sizes, the bias fused into the last
                               GEMM (``F.linear``) or added in place;
* ``<s> divisor``              the structure with hyperparameters whose blocks divide 384 / 1536 and whose
                               weights are <= the budget (bias not counted) -- chosen from the per-shape
                               timing grid of ``benchmarks/e2e_hparams.py`` -- with deftly's forward;
* ``<s> divisor fast``         the same with the fast forward.

    python benchmarks/e2e_fastpath.py --threads 1 --clock cpu --batches 1 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ENC = r"encoder\..*"
ATTN = r"encoder\.layer\.\d+\.attention\..*"  # query/key/value/output.dense: 384x384
INTER = r"encoder\.layer\.\d+\.intermediate\.dense"  # 384x1536
OUT = r"encoder\.layer\.\d+\.output\.dense"  # 1536x384

# divisor hyperparameters at <= 25% of the weights (bias not counted), the fastest or near-fastest per
# shape in benchmarks/e2e_hparams.py (rows 128 and 4096)
DIVISOR = {
    "blockdiag": {ATTN: {"nblocks": 4}, INTER: {"nblocks": 4}, OUT: {"nblocks": 4}},
    "monarch": {ATTN: {"nblocks": 4, "out_blocks": 4, "rank": 12},
                INTER: {"nblocks": 4, "out_blocks": 16, "rank": 12},
                OUT: {"nblocks": 4, "out_blocks": 4, "rank": 19}},
    "lowrank": {ATTN: {"rank": 48}, INTER: {"rank": 76}, OUT: {"rank": 76}},
}


# ------------------------------------------------------------------------------------------ fast forwards
def _lowrank_fast(self, x: Tensor) -> Tensor:
    return F.linear(F.linear(x, self.V), self.U, self.bias)


def _blockdiag_fast(self, x: Tensor) -> Tensor:
    from deftly.kernels.blockdiag import blockdiag_forward

    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features)
    if self.in_part.exact and self.out_part.exact:
        y = blockdiag_forward(x2, self.weight)
    else:
        y = self.out_part.unpad(blockdiag_forward(self.in_part.pad(x2), self.weight))
    if self.bias is not None:
        y = y.add_(self.bias)
    return y.view(*lead, self.out_features)


def _monarch_fast(self, x: Tensor) -> Tensor:
    from deftly.kernels.monarch import monarch_forward

    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features)
    y, _h = monarch_forward(self.in_part.pad(x2), self.R, self.L, self.rank)
    if y.shape[1] != self.out_features:
        y = y[:, : self.out_features]
    if self.bias is not None:
        y = y.add_(self.bias)
    return y.reshape(*lead, self.out_features)


FAST = {"lowrank": _lowrank_fast, "blockdiag": _blockdiag_fast, "monarch": _monarch_fast}


def make_fast(model: nn.Module) -> int:
    import deftly

    n = 0
    for m in model.modules():
        if isinstance(m, deftly.StructuredLinear) and m.name in FAST:
            m.forward = types.MethodType(FAST[m.name], m)
            n += 1
    return n


def build(dense: nn.Module, structure: str, budget: float | None, divisor: bool = False) -> nn.Module:
    import deftly

    m = copy.deepcopy(dense)
    torch.manual_seed(0)
    if structure == "dense":
        cfg = deftly.StructureConfig(structure="dense", target_modules=ENC, init="random")
    elif divisor:
        cfg = deftly.StructureConfig(structure=structure, target_modules=ENC, init="random",
                                     overrides=DIVISOR[structure])
    else:
        cfg = deftly.StructureConfig(structure=structure, target_modules=ENC, budget=budget, init="random")
    deftly.structurize(m, cfg)
    return m.eval()


def hparams(model: nn.Module) -> dict[str, Any]:
    import deftly

    out = {}
    for m in model.modules():
        if isinstance(m, deftly.StructuredLinear):
            out.setdefault(f"{m.in_features}x{m.out_features}", m.hparams())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--structures", nargs="+", default=["lowrank", "blockdiag", "monarch"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of dense and '<s> divisor'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    from deftly.data import minilm, wikipedia

    tok, dense = minilm.load()
    dense.eval()
    paras = [p.strip() for p in wikipedia.text().split("\n") if len(p.strip()) >= 900]
    models: dict[str, nn.Module] = {"dense": dense, "deftly-dense": build(dense, "dense", None)}
    for s in args.structures:
        models[s] = build(dense, s, args.budget)
        models[f"{s} fast"] = copy.deepcopy(models[s])
        make_fast(models[f"{s} fast"])
        if s in DIVISOR:
            models[f"{s} divisor"] = build(dense, s, None, divisor=True)
            models[f"{s} divisor fast"] = copy.deepcopy(models[f"{s} divisor"])
            make_fast(models[f"{s} divisor fast"])
    info = {k: {"hparams": hparams(m)} for k, m in models.items()}
    for k, v in info.items():
        print(k, v["hparams"], flush=True)
    results: dict[str, Any] = {"threads": args.threads, "clock": args.clock, "budget": args.budget,
                               "models": info, "batches": {}}
    for batch in args.batches:
        enc = tok(paras[:batch], padding="max_length", truncation=True, max_length=args.tokens,
                  return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        fns: dict[str, Callable[[], Any]] = {}
        for k, m in models.items():
            fns[k] = (lambda m=m: m(**enc).last_hidden_state)
        if args.compile:
            for k in ["dense"] + [f"{s} divisor" for s in args.structures] + list(args.structures):
                if k in models:
                    cm = torch.compile(models[k], dynamic=False)
                    fns[f"{k} [compiled]"] = (lambda cm=cm: cm(**enc).last_hidden_state)
        with torch.inference_mode():
            ref = fns["dense"]()
            for k, f in fns.items():  # warm-up: auto-tuning, compiles; fast == slow path numerically
                t0 = time.perf_counter()
                y = f()
                f()
                print(f"warm {k}: {time.perf_counter() - t0:.1f} s", flush=True)
                assert y.shape == ref.shape
            for s in args.structures:
                for a, b in ((s, f"{s} fast"), (f"{s} divisor", f"{s} divisor fast")):
                    if a in fns and b in fns:
                        d = (fns[a]() - fns[b]()).abs().max().item()
                        assert d < 1e-3, (a, b, d)
            n = {k: max(1, int(0.2 / max(1e-6, (lambda t0: (f(), time.perf_counter() - t0)[1])(time.perf_counter()))))
                 for k, f in fns.items()}
            n = dict.fromkeys(fns, min(n.values()))
            ts: dict[str, list[float]] = {k: [] for k in fns}
            keys = list(fns)
            for r in range(args.rounds):
                for k in (keys if r % 2 == 0 else keys[::-1]):
                    t0 = now()
                    for _ in range(n[k]):
                        fns[k]()
                    ts[k].append((now() - t0) / n[k])
        d = statistics.median(ts["dense"])
        res = {}
        for k, v in ts.items():
            t = statistics.median(v)
            # paired: each round's ratio to that round's dense sample
            paired = statistics.median(a / b for a, b in zip(ts["dense"], v))
            res[k] = {"ms": 1e3 * t, "speedup": d / t, "speedup_paired": paired, "samples_ms": [1e3 * x for x in v]}
            print(f"batch {batch:3d} x {args.tokens}: {k:28s} {1e3 * t:9.1f} ms  {d / t:5.2f}x  (paired {paired:5.2f}x)",
                  flush=True)
        results["batches"][str(batch)] = res
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
