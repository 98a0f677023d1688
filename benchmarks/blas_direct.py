"""Would a copy-free kernel close the block-diagonal gap? The BLAS's batched GEMM called directly, with strides.

    python benchmarks/blas_direct.py [--n 4096] [--blocks 64] [--batches 64 2048] [--threads 1] [--rounds 5]

Issue 14 asks block-diagonal (64 blocks, n = 4096, fp32) for >= 70% of ``nn.Linear``'s GFLOP/s, and
suggests a compiled kernel "calling the BLAS batched gemm with strides" so that no layout copy is made.
This measures that kernel's ceiling: ``deftly.kernels.blas`` calls MKL's ``sgemm_batch`` (the BLAS inside
PyTorch's x86 CPU wheel) with one pointer per block straight into ``x``, ``W``, ``y`` (and
``gy``, ``dx``, ``dW`` for the backward): no copy, and here no allocation either (outputs pre-allocated),
the best a C++ extension making the same calls could reach. Also the forward in row tiles (each call
covers ``--tile`` rows of every block, so a tile's rows stay in cache). The layer's ``blas`` backend
(the same calls with fresh outputs and autograd) is the ``deftly, blas`` row.

Rows, in one process, rounds interleaved, the order rotating from round to round (the median of each
over ``--rounds`` rounds):
  * ``nn.Linear``: ``x @ W^T`` (fwd) and fwd + ``gy @ W`` + ``gy^T @ x`` (fwd+bwd);
  * ``deftly``: the block-diagonal layer as users call it (the dispatcher's choice: ``native``/``kernel``
    below 1024 rows, ``blas`` from there), and forced to ``kernel`` and to ``blas``;
  * ``blas calls``: the copy-free ``sgemm_batch`` calls alone.
Each prints GFLOP/s and its share of ``nn.Linear``'s rate for the same mode. Exits 2 where the torch build
has no MKL ``sgemm_batch`` (e.g. aarch64 wheels with OpenBLAS).
"""

from __future__ import annotations

import argparse
import time

import torch

import deftly
from deftly.kernels import blas


def blockdiag_calls(x, w, y, gy=None, dx=None, dw=None, rows: range | None = None):
    """Closures making the library's ``gemm_batch`` calls of ``y = blockdiag(w) x`` into the pre-allocated
    ``y`` (over ``rows``: contiguous row slices) and, given ``gy``/``dx``/``dw``, of its backward."""
    r = rows or range(x.shape[0])
    xs, ys = x[r.start:r.stop], y[r.start:r.stop]
    calls = [lambda: blas.blockdiag_blas_forward(xs, w, out=ys)]
    if gy is not None:
        calls.append(lambda: blas.blockdiag_blas_backward(gy, x, w, need_w=False, dx_out=dx))
        calls.append(lambda: blas.blockdiag_blas_backward(gy, x, w, need_x=False, dw_out=dw))
    return calls


def _median_times(cases: dict, rounds: int, batch: int) -> dict:
    for f in cases.values():
        f()
    times: dict = {c: [] for c in cases}
    order = list(cases.items())
    for r in range(rounds):  # the order rotates: no row always runs right after nn.Linear's cache sweep
        for c, f in order[r % len(order):] + order[:r % len(order)]:
            reps = 1 if c[1] == "nn.Linear" and batch >= 1024 else 5
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            times[c].append((time.perf_counter() - t0) / reps)
    return {c: sorted(v)[len(v) // 2] for c, v in times.items()}


def measure(n: int, k: int, batch: int, rounds: int, tile: int) -> dict:
    """``{(mode, name): median seconds}``, after checking every path against the layer's autograd."""
    p = n // k
    torch.manual_seed(0)
    x, gy = torch.randn(batch, n), torch.randn(batch, n)
    lin = torch.nn.Linear(n, n, bias=False)
    layer = deftly.make("blockdiag", n, n, nblocks=k, bias=False)
    forced = {be: deftly.make("blockdiag", n, n, nblocks=k, bias=False) for be in ("kernel", "blas")}
    for be, m in forced.items():
        m.load_state_dict(layer.state_dict())
        m.kernel_backend = be
    w = layer.weight.detach()
    y, dx, dw = torch.empty(batch, n), torch.empty(batch, n), torch.empty(k, p, p)
    full = blockdiag_calls(x, w, y, gy, dx, dw)
    tiles = [blockdiag_calls(x, w, y, rows=range(r, min(r + tile, batch)))[0] for r in range(0, batch, tile)]
    xr = x.clone().requires_grad_(True)
    ref = layer(xr)
    ref.backward(gy)
    ref = ref.detach()
    for c in full:
        c()
    for got, want in ((y, ref), (dx, xr.grad), (dw, layer.weight.grad)):
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), "the BLAS calls disagree"
    for t in tiles:
        t()
    assert float((y - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), "the tiled calls disagree"

    def fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def fwdbwd(m):
        def f():
            m(x.detach().requires_grad_(True)).backward(gy)
        return f

    cases = {}
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        cases[(mode, "nn.Linear")] = make(lin)
        cases[(mode, "deftly (dispatcher)")] = make(layer)
        for be, m in forced.items():
            cases[(mode, f"deftly, {be}")] = make(m)
    cases[("fwd", "blas calls")] = full[0]
    cases[("fwd", f"blas calls, {tile}-row tiles")] = lambda: [t() for t in tiles]
    cases[("fwd+bwd", "blas calls")] = lambda: [c() for c in full]
    return _median_times(cases, rounds, batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 2048])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tile", type=int, default=128)
    args = ap.parse_args(argv)
    if not blas.available():
        print("skipped: this torch build has no MKL gemm_batch (libtorch_cpu.so sgemm_batch)")
        return 2
    torch.set_num_threads(args.threads)
    n, k = args.n, args.blocks
    p = n // k
    print(f"block-diagonal {k} blocks of {p}x{p}, n={n}, fp32, {args.threads} thread(s); median of "
          f"{args.rounds} interleaved rounds; share = GFLOP/s / nn.Linear's GFLOP/s in the same mode")
    for batch in args.batches:
        med = measure(n, k, batch, args.rounds, args.tile)
        print(f"\nbatch {batch}")
        for (mode, name), s in sorted(med.items(), key=lambda kv: kv[0][0] != "fwd"):
            mult = 1 if mode == "fwd" else 3
            rate = mult * 2 * batch * n * (n if name == "nn.Linear" else p) / s / 1e9
            base = mult * 2 * batch * n * n / med[(mode, "nn.Linear")] / 1e9
            print(f"  {mode:8s} {name:30s} {s * 1e3:9.3f} ms {rate:7.1f} GFLOP/s {100 * rate / base:5.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
