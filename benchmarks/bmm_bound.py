"""How fast can a block-diagonal layer be on this CPU? The batched matmul alone, in each layout.

    python benchmarks/bmm_bound.py [--n 4096] [--batch 2048] [--blocks 64] [--threads 2]

Times (median, ``torch.utils.benchmark``) ``nn.Linear``'s GEMM ``x @ W^T`` and the one ``torch.bmm`` a
block-diagonal multiply needs, in the layouts a kernel can choose: blocks-first with the batch in the
middle (``(k, B, p) @ (k, p, q)``, what ``deftly.kernels.blockdiag`` uses), the same on the strided view
of ``x`` (no copy), and batch-last (``(k, q, p) @ (k, p, B)``) — each with a fresh and with a
pre-allocated output (``out=``: no page faults on a fresh 32 MB buffer). Prints GFLOP/s and the share of
``nn.Linear``'s rate: the ceiling for "block-diagonal at >= 70% of nn.Linear's GFLOP/s" before any copy.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.benchmark import Timer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, n, k = args.batch, args.n, args.blocks
    p = n // k
    torch.manual_seed(0)
    x, W, w = torch.randn(B, n), torch.randn(n, n), torch.randn(k, p, p)
    xb = x.view(B, k, p).transpose(0, 1).contiguous()  # (k, B, p)
    xT = x.t().contiguous().view(k, p, B)  # (k, p, B)
    wt = w.transpose(1, 2).contiguous()
    o_mid, o_last = torch.empty(k, B, p), torch.empty(k, p, B)

    def t(fn) -> float:
        return Timer("fn()", globals={"fn": fn}, num_threads=args.threads).blocked_autorange(min_run_time=1).median

    lin = t(lambda: x @ W.t())
    lin_rate = 2 * B * n * n / lin / 1e9
    print(f"n={n} batch={B} blocks={k} ({p}x{p}), {args.threads} threads")
    print(f"{'nn.Linear GEMM x @ W^T':48s} {lin * 1e3:8.2f} ms {lin_rate:7.1f} GFLOP/s  100%")
    flops = 2 * B * n * p
    cases = [("bmm (k,B,p)@(k,p,q), fresh output", lambda: torch.bmm(xb, wt)),
             ("bmm (k,B,p)@(k,p,q), out=", lambda: torch.bmm(xb, wt, out=o_mid)),
             ("bmm strided view of x, fresh output", lambda: torch.bmm(x.view(B, k, p).transpose(0, 1), wt)),
             ("bmm batch-last (k,q,p)@(k,p,B), fresh output", lambda: torch.bmm(w, xT)),
             ("bmm batch-last (k,q,p)@(k,p,B), out=", lambda: torch.bmm(w, xT, out=o_last)),
             ("copy x -> (k, B, p) blocks", lambda: x.view(B, k, p).transpose(0, 1).contiguous())]
    for name, fn in cases:
        s = t(fn)
        rate = flops / s / 1e9
        share = f"{100 * rate / lin_rate:4.0f}%" if name.startswith("bmm") else "    "
        print(f"{name:48s} {s * 1e3:8.2f} ms {rate if name.startswith('bmm') else 0:7.1f} GFLOP/s  {share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
