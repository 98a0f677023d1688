"""Per-call time of every structure's forward at batch 1 against ``nn.Linear`` (issue 14 item 2).

One process, every callable of a size timed in interleaved rounds (a change of load from other processes
hits them alike); the statistic is each callable's fastest round (per call), the one least disturbed by
other processes on a shared machine, and the ratios are taken between those. Inference
(``torch.no_grad()``), float32, one thread unless ``--threads``.

``dense`` (deftly's dense structure: ``F.linear`` with the bias fused) against ``nn.Linear`` is the
per-call overhead of deftly's forward itself. For Monarch the kernel called directly (no module call,
checks or dispatch) and a hand-written minimal forward are timed too: two ``bmm``'s on pre-transposed
weights, one small copy between them (``bmm`` needs unit-stride rows: on the permuted view CPU torch
loops matrix by matrix, ~10x slower), the output permutation fused with the bias add, no checks: the
floor of a Python-level Monarch at batch 1.

    python benchmarks/forward_overhead.py                 # n = 1024, 4096 and 1024x4096, every structure
    python benchmarks/forward_overhead.py --profile       # + cProfile of the remaining per-call overhead
    python benchmarks/forward_overhead.py --sizes 1024x1024 --structures monarch blockdiag

Hyperparameters are the benchmark suite's (:func:`deftly.bench.config.bench_hparams`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch import nn
from torch.nn import functional as F

import deftly
import deftly.kernels as K
from deftly.bench.config import bench_hparams


def _size(s: str) -> tuple[int, int]:
    i, _, o = s.partition("x")
    return int(i), int(o or i)


def minimal_monarch(layer):
    """Two bmm's and a bias add on pre-transposed weights: the floor for a Python Monarch at batch 1."""
    k, l, r, s = layer.nblocks, layer.out_blocks, layer.rank, layer.block_out
    p = layer.in_part.block
    assert layer.in_part.exact and s * l == layer.out_features
    Rt = layer.R.detach().transpose(1, 2).contiguous()  # (k, p, l*r)
    Lt = layer.L.detach().transpose(1, 2).contiguous()  # (l, k*r, s)
    b = layer.bias.detach()

    def fwd(x):
        h = torch.bmm(x.view(k, 1, p), Rt)  # (k, 1, l*r), batch 1: x is (k, p) blocks
        h = h.view(k, l, r).transpose(0, 1).reshape(l, 1, k * r).contiguous()  # unit-stride rows for bmm
        y = torch.bmm(h, Lt)  # (l, 1, s)
        return torch.add(b.view(s, l), y.view(l, s).t()).view(1, s * l)  # P^T fused with the bias add
    return fwd


def time_interleaved(fns: dict, rounds: int, block: float) -> dict[str, float]:
    """Fastest per-call time of each callable over ``rounds`` interleaved blocks of about ``block`` seconds
    (the number of calls per block fixed per callable from a warm estimate: at least 5)."""
    number = {}
    for k, f in fns.items():  # warm-up: first-call work (dispatch decision, caches)
        f()
        f()
        est = min(_once(f) for _ in range(5))
        number[k] = max(5, int(block / max(est, 1e-7)))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            n = number[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / n)
    return best


def _once(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1024x1024", "4096x4096", "1024x4096"])
    ap.add_argument("--structures", nargs="+", default=None, help="default: every registered structure")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--block", dest="min_block", type=float, default=0.002, help="seconds per timed block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile Monarch's forward at the first size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = args.structures or deftly.structures()  # "dense" too: its ratio is the pure dispatch overhead
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, batch 1, no_grad; "
          f"per-call time = fastest of {args.rounds} interleaved blocks")
    slower = []
    for spec in args.sizes:
        i, o = _size(spec)
        x = torch.randn(1, i)
        lin = nn.Linear(i, o)
        layers = {n: deftly.make(n, i, o, **bench_hparams(n, i, o)) for n in names}
        fns = {"nn.Linear": lambda lin=lin, x=x: lin(x)}
        for n, layer in layers.items():
            fns[n] = lambda layer=layer, x=x: layer(x)
        if "monarch" in layers and layers["monarch"].in_part.exact:
            mono = minimal_monarch(layers["monarch"])
            fns["monarch minimal (2 bmm)"] = lambda mono=mono, x=x: mono(x)
            mlayer = layers["monarch"]
        if "monarch" in layers and layers["monarch"].in_part.exact and hasattr(K, "monarch_matmul"):
            fns["monarch kernel, no forward"] = lambda m=mlayer, x=x: K.monarch_matmul(x, *m._kernel_args(),
                                                                                      bias=m.bias)
            with torch.no_grad():
                torch.testing.assert_close(mono(x), layers["monarch"](x), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            best = time_interleaved(fns, args.rounds, args.min_block)
        base = best["nn.Linear"]
        print(f"\n{i}x{o}   nn.Linear {base * 1e6:8.1f} us")
        print(f"  {'structure':26s} {'backend':8s} {'us/call':>9s} {'vs Linear':>10s}")
        for k, t in best.items():
            if k == "nn.Linear":
                continue
            layer = layers.get(k)
            bk = _backend(layer, x) if layer is not None else "-"
            ratio = t / base
            flag = "  SLOWER" if ratio > 1 and layer is not None else ""
            print(f"  {k:26s} {bk:8s} {t * 1e6:9.1f} {ratio:9.2f}x{flag}")
            if flag:
                slower.append(f"{k}@{i}x{o} ({ratio:.2f}x)")
        if "monarch" in layers and "monarch minimal (2 bmm)" in best:
            print(f"  monarch / minimal: {best['monarch'] / best['monarch minimal (2 bmm)']:.2f}x")
    print("\nslower than nn.Linear at batch 1:", ", ".join(slower) if slower else "none")
    # the overhead itself, where the multiply is cheap: deftly's dense structure against nn.Linear and
    # against F.linear (no module call) at 256x256
    x = torch.randn(1, 256)
    lin, dense = nn.Linear(256, 256), deftly.make("dense", 256, 256)
    w, b = lin.weight, lin.bias
    with torch.no_grad():
        best = time_interleaved({"F.linear": lambda: F.linear(x, w, b), "nn.Linear": lambda: lin(x),
                                 "deftly dense": lambda: dense(x)}, args.rounds * 2, args.min_block)
    print(f"\nper-call overhead at 256x256: F.linear {best['F.linear'] * 1e6:.1f} us, nn.Linear "
          f"{best['nn.Linear'] * 1e6:.1f} us, deftly dense {best['deftly dense'] * 1e6:.1f} us: deftly's "
          f"forward costs {(best['deftly dense'] - best['nn.Linear']) * 1e6:+.1f} us over nn.Linear's")
    if args.profile:
        i, o = _size(args.sizes[0])
        layer = deftly.make("monarch", i, o, **bench_hparams("monarch", i, o))
        x = torch.randn(1, i)
        n = 20000
        with torch.no_grad():
            for _ in range(10):
                layer(x)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                layer(x)
            prof.disable()
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out).sort_stats("tottime")
        st.print_stats(18)
        print(f"\ncProfile of {n} Monarch forwards at {i}x{o}, batch 1 (tottime per function; cProfile "
              f"inflates Python-level costs, read the ranking, not the absolute times):")
        print("\n".join(out.getvalue().splitlines()[4:]))


def _backend(layer, x) -> str:
    with torch.no_grad():
        try:
            return K.choose(layer, x)
        except TypeError:  # the API before the dispatch moved into the base class (for before/after runs)
            return K.choose(layer, x, layer._matmul)


if __name__ == "__main__":
    main()
