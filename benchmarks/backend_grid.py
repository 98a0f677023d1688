"""Which backend is fastest for one structure, by shape and batch? The grid behind the static choices.

    python benchmarks/backend_grid.py [--structure blockdiag] [--backends native kernel blas]
                                      [--shapes 384:4 1024:4 1024:32 1536:8 4096:64 4096:16]
                                      [--batches 8 16 32 64 128 256 1024 2048] [--threads 1] [--rounds 5]

For each square shape ``n:nblocks`` and batch, one layer per backend (same weights, each forced with
``layer.kernel_backend``: no switching inside a timed call) is timed forward (no gradient) and forward +
backward, the backends interleaved round by round in one process (median per backend). Prints the
milliseconds and, per mode, the last backend's time over the best of the others (< 1: it wins). The
dispatcher's static rules (``KernelSpec.default`` / ``layer_default`` in the layer module) quote it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import deftly


def medians(fns: dict, reps: int, rounds: int) -> dict:
    for f in fns.values():
        f()
    ts: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            ts[k].append((time.perf_counter() - t0) / reps)
    return {k: sorted(v)[len(v) // 2] for k, v in ts.items()}


def row(layers: dict, n: int, batch: int, rounds: int) -> dict:
    x = torch.randn(batch, n)
    xg, gy = x.clone().requires_grad_(True), torch.randn(batch, n)
    reps = max(2, min(100, int(3e6 / (n * n / 64 * batch / 64 + 1e4))))
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        def make(m, mode=mode):
            if mode == "fwd":
                def f():
                    with torch.no_grad():
                        m(x)
            else:
                def f():
                    m(xg).backward(gy)
            return f
        out[mode] = medians({be: make(m) for be, m in layers.items()}, reps, rounds)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structure", default="blockdiag")
    ap.add_argument("--backends", nargs="+", default=["native", "kernel", "blas"])
    ap.add_argument("--shapes", nargs="+", default=["384:4", "1024:4", "1024:32", "1536:8", "4096:64", "4096:16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 1024, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    last = args.backends[-1]
    print(f"{args.structure}, {args.threads} thread(s), median of {args.rounds} interleaved rounds; ms per call; "
          f"'{last}/best' = {last}'s time over the best other backend's")
    for shape in args.shapes:
        n, nb = (int(v) for v in shape.split(":"))
        base = deftly.make(args.structure, n, n, nblocks=nb)
        layers = {}
        for be in args.backends:
            layers[be] = copy.deepcopy(base)
            layers[be].kernel_backend = be
        for batch in args.batches:
            if n * batch > 4096 * 2048:
                continue
            r = row(layers, n, batch, args.rounds)
            cells = []
            for mode, t in r.items():
                others = min(v for k, v in t.items() if k != last)
                ms = " ".join(f"{k} {v * 1e3:8.3f}" for k, v in t.items())
                cells.append(f"{mode}: {ms} ({last}/best {t[last] / others:.2f})")
            print(f"{n:5d} {nb:3d} {batch:5d}  " + " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
