#!/usr/bin/env python
"""Which hyperparameters are fast? MiniLM's linear shapes at a weight budget (bias not counted), every
block count that divides the sizes, timed with deftly's own kernel (no dispatch), vs ``F.linear``.

    python benchmarks/e2e_hparams.py --budget 0.25 --rows 128 4096 --threads 1 --clock cpu

Part of the issue-14 analysis (docs/speed_e2e.md). Interleaved rounds; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

SHAPES = [(384, 384), (384, 1536), (1536, 384)]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid(structure: str, i: int, o: int, budget: float):
    import deftly

    cls = deftly.get(structure)
    lim = budget * i * o
    out = []
    if structure == "monarch":
        for k in divisors(i):
            if not 2 <= k <= 64:
                continue
            for l in sorted({k, max(1, k * o // i)}):
                if o % l:
                    continue
                p, s = i // k, o // l
                r = 0
                while r + 1 <= min(p, s) and cls.param_count(i, o, nblocks=k, out_blocks=l, rank=r + 1) <= lim:
                    r += 1
                if r:
                    out.append({"nblocks": k, "out_blocks": l, "rank": r})
    elif structure == "blockdiag":
        for k in divisors(i):
            if k in divisors(o) and cls.param_count(i, o, nblocks=k) <= lim and k <= 64:
                out.append({"nblocks": k})
    elif structure == "lowrank":
        r = int(lim // (i + o))
        out.append({"rank": r})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--rows", nargs="+", type=int, default=[128, 4096])
    ap.add_argument("--structures", nargs="+", default=["lowrank", "blockdiag", "monarch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep-triton-probe", action="store_true",
                    help="leave deftly's per-call Triton availability probe in (forced backends)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    import deftly
    import deftly.kernels

    if not args.keep_triton_probe:
        # a forced backend re-evaluates every backend's availability on every call, and the Triton one runs
        # importlib.util.find_spec("triton") each time (~70 us CPU, ~0.6 ms wall on the loaded machine):
        # not what we want to time here (it is reported separately in docs/speed_e2e.md)
        from deftly.kernels import triton_kernels

        triton_kernels.available = lambda device=None: False

    results = []
    for (i, o) in SHAPES:
        for B in args.rows:
            x = torch.randn(B, i)
            W, b = torch.randn(o, i), torch.randn(o)
            fns = {"F.linear": lambda: F.linear(x, W, b)}
            meta = {}
            for s in args.structures:
                for hp in grid(s, i, o, args.budget):
                    layer = deftly.make(s, i, o, **hp).eval()
                    if s in ("monarch", "blockdiag"):
                        layer.kernel_backend = "kernel"
                    else:
                        layer.kernel_backend = "native"
                    key = f"{s} " + ",".join(f"{k}={v}" for k, v in hp.items())
                    fns[key] = (lambda layer=layer: layer(x))
                    meta[key] = {"structure": s, "hparams": hp,
                                 "fraction": layer.num_params() / (i * o + o)}
            ts = {k: [] for k in fns}
            with torch.inference_mode():
                for f in fns.values():
                    f()
                    f()
                n = max(1, int(0.03 / max(1e-6, (lambda t0: (fns["F.linear"](), time.perf_counter() - t0)[1])(time.perf_counter()))))
                keys = list(fns)
                for r in range(args.rounds):
                    for k in (keys if r % 2 == 0 else keys[::-1]):
                        t0 = now()
                        for _ in range(n):
                            fns[k]()
                        ts[k].append((now() - t0) / n)
            d = statistics.median(ts["F.linear"])
            for k, v in ts.items():
                t = statistics.median(v)
                row = {"shape": f"{i}x{o}", "rows": B, "variant": k, "us": 1e6 * t, "speedup": d / t, **meta.get(k, {})}
                results.append(row)
                print(f"{i}x{o} rows={B:5d} {k:45s} {1e6 * t:10.0f} us  {d / t:5.2f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
