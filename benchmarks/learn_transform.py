"""Learning fast transforms from data: a random butterfly fitted to (x, T x) pairs recovers T.

Reproduces the experiment of Dao et al., "Learning Fast Algorithms for Linear Transforms Using Butterfly
Factorizations" (ICML 2019) with deftly's layer and optimiser settings of
:func:`deftly.transforms.learn.fit_transform`: for T = the orthonormal DFT (complex butterfly with the
fixed bit-reversal input gather) and T = the orthonormal Hadamard matrix (real butterfly), n = 16 .. 1024,
Adam (lr 0.1, cosine decay, max(400, n) steps), fresh Gaussian batches, and reports the recovery
``RMSE = sqrt(mean |W - T|^2)`` (entries of T have magnitude 1/sqrt(n)) and the wall time.

Run: ``python benchmarks/learn_transform.py`` (a few minutes on 2 cores; ``--sizes 16 64`` for a quick
run); writes ``benchmarks/results/learn_transform.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import deftly.transforms as T
from deftly.transforms.learn import fit_transform, learnable_butterfly_for

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--kinds", nargs="+", default=["dft", "hadamard"], choices=["dft", "hadamard"])
    ap.add_argument("--steps", type=int, default=None,
                    help="Adam steps per fit (default max(400, n): at n=1024 the real Hadamard butterfly "
                         "needs more than 400)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--max-batch", type=int, default=256, help="inputs per step: min(n, this)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these small per-factor ops do not gain from more, and "
                         "on a shared machine extra threads cost up to 20x)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    rows = []
    for kind in args.kinds:
        for n in args.sizes:
            dtype = torch.float64 if n <= 64 else torch.float32  # float32 where float64 would be slow
            target = T.dft(n, norm="ortho") if kind == "dft" else T.hadamard(n, norm="ortho")
            layer = learnable_butterfly_for(kind, n, dtype=dtype, seed=args.seed)
            with torch.no_grad():
                start = (layer.to_dense() - target.to_dense().to(layer.to_dense().dtype)).abs().pow(2) \
                    .mean().sqrt().item()
            steps = args.steps or max(400, n)
            res = fit_transform(layer, target, steps=steps, lr=args.lr, batch=min(n, args.max_batch),
                                seed=args.seed + 1)
            row = {"transform": kind, "n": n, "dtype": str(dtype).replace("torch.", ""), "steps": res.steps,
                   "batch": min(n, args.max_batch), "params": layer.num_params(), "rmse_start": start,
                   "rmse": res.rmse, "rmse_over_entry": res.rmse * math.sqrt(n), "seconds": res.seconds}
            rows.append(row)
            print(f"{kind:8s} n={n:5d} {row['dtype']:7s} RMSE {start:.2e} -> {res.rmse:.2e} "
                  f"(x sqrt(n): {row['rmse_over_entry']:.1e}) in {res.seconds:.1f} s", flush=True)

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "lr": args.lr,
            "steps": args.steps or "max(400, n)", "seed": args.seed}
    (args.out / "learn_transform.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Learning a transform from (x, T x) pairs", "",
             (f"Random-init butterfly, Adam lr {args.lr} with cosine decay, {meta['steps']} steps, Gaussian "
              f"batches of min(n, {args.max_batch}); RMSE of the dense matrices (entries of T are "
              f"1/sqrt(n) in size). `python benchmarks/learn_transform.py`, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads."), "",
             "| transform | n | dtype | params | steps | RMSE at start | RMSE learned | RMSE x sqrt(n) | time (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['transform']} | {r['n']} | {r['dtype']} | {r['params']} | {r['steps']} | "
                     f"{r['rmse_start']:.2e} | "
                     f"{r['rmse']:.2e} | {r['rmse_over_entry']:.1e} | {r['seconds']:.1f} |")
    (args.out / "learn_transform.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'learn_transform.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
