#!/usr/bin/env python
"""Where a structurized MiniLM loses time, layer by layer (issue 14, the analysis behind docs/speed_e2e.md).

For each MiniLM linear shape (384x384, 384x1536, 1536x384) and each structure at the budget's
hyperparameters, at ``rows`` = tokens per call (128 = one sentence, 4096 = 32 x 128), times, interleaved in
one process (median of rounds, each round every variant once in turn):

* ``nn.Linear`` (``F.linear`` with bias, MKL sgemm) — the dense baseline;
* ``deftly``: the layer's ``forward`` as users call it (input checks, dispatch, kernel, bias, reshapes);
* ``deftly[<backend>]``: the same with the backend forced (``layer.kernel_backend``), to see what the
  auto-dispatch left on the table;
* ``minimal``: a hand-written multiply of the same weights (what the layer could cost: no checks, no
  dispatch, bias fused into the last GEMM, no padding copies when the blocks divide the size);
* ``+divisor hparams``: the structure at the nearest hyperparameters whose blocks divide the sizes, same
  budget class (minimal multiply), to show what padding costs;
* per-call overhead pieces, measured alone: ``_check_input``, ``weight_dtype``, ``dispatch.choose``,
  ``dispatch._state`` (the dense-weight cache check), ``Partition.pad``/``unpad``, the bias add.

    python benchmarks/e2e_layers.py                      # rows 128 and 4096, budget 0.25
    python benchmarks/e2e_layers.py --rows 4096 --budget 0.5 --out benchmarks/results/e2e/layers_50.json

Prints a table and writes JSON (``--out``). Uses deftly internals only to *measure* them (read-only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SHAPES = [(384, 384), (384, 1536), (1536, 384)]
STRUCTURES = ["lowrank", "monarch", "blockdiag", "lrbd", "btt"]


CLOCK = [time.perf_counter]


def bench(fns: dict[str, Callable[[], Any]], rounds: int, min_sample: float) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved round by round (clock: ``--clock``)."""
    now = CLOCK[0]
    for f in fns.values():
        f()
        f()
    ns = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        ns[k] = max(1, int(min_sample / max(time.perf_counter() - t0, 1e-7)))
    ts: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            f, n = fns[k], ns[k]
            t0 = now()
            for _ in range(n):
                f()
            ts[k].append((now() - t0) / n)
    return {k: statistics.median(v) for k, v in ts.items()}


# --------------------------------------------------------------------------------------- minimal forwards
def minimal_forward(layer) -> Callable[[Tensor], Tensor] | None:
    """The fewest-op multiply of ``layer``'s own weights for 2-D input, bias fused where possible."""
    name = layer.name
    b = layer.bias
    if name == "lowrank":
        V, U = layer.V, layer.U
        Ut = U.t()
        return lambda x: torch.addmm(b, x @ V.t(), Ut) if b is not None else (x @ V.t()) @ Ut
    if name == "blockdiag":
        W = layer.weight  # (k, q, p)
        k, q, p = W.shape
        Wt = W.transpose(1, 2).contiguous()  # (k, p, q)
        if layer.in_part.exact and layer.out_part.exact:
            def f(x):
                y = torch.bmm(x.view(-1, k, p).transpose(0, 1), Wt)  # (k, B, q)
                return torch.add(b, y.transpose(0, 1).reshape(-1, k * q)) if b is not None else \
                    y.transpose(0, 1).reshape(-1, k * q)
            return f
        ip, op = layer.in_part, layer.out_part

        def fpad(x):
            y = torch.bmm(ip.pad(x).view(-1, k, p).transpose(0, 1), Wt)
            y = op.unpad(y.transpose(0, 1).reshape(-1, k * q))
            return y + b if b is not None else y
        return fpad
    if name == "monarch":
        R, L, r = layer.R, layer.L, layer.rank
        k, lr, p = R.shape
        l, s, kr = L.shape
        Rt = R.transpose(1, 2).contiguous()  # (k, p, l*r)
        Lt = L.transpose(1, 2).contiguous()  # (l, k*r, s)
        out = layer.out_features
        ip = layer.in_part

        def fm(x):
            B = x.shape[0]
            xb = ip.pad(x).view(B, k, p).transpose(0, 1)  # (k, B, p) strided
            h = torch.bmm(xb, Rt)  # (k, B, l*r)
            h = h.view(k, B, l, r).permute(2, 1, 0, 3).reshape(l, B, k * r)
            y = torch.bmm(h, Lt)  # (l, B, s)
            y = y.permute(1, 2, 0).reshape(B, s * l)
            if s * l != out:
                y = y[:, :out]
            return y + b if b is not None else y
        return fm
    if name == "lrbd":
        lrf = minimal_forward(layer.lowrank)
        bdf = minimal_forward(layer.blockdiag)
        n = min(layer.in_features, layer.out_features)

        def fl(x):
            y = lrf(x) + bdf(x)
            if layer.out_features <= layer.in_features:
                y = y + x[:, :n]
            else:
                y[:, :n] += x
            return y + b if b is not None else y
        return fl
    return None


def divisor_variant(structure: str, i: int, o: int, hp: dict[str, Any], budget: float):
    """Hyperparameters of the same structure whose blocks divide the sizes and whose weight count is within
    ``budget`` of the dense weight (bias not counted) -- the 'speed-friendly' choice."""
    import deftly

    cls = deftly.get(structure)
    best = None
    limit = budget * i * o * 1.0001
    if structure == "blockdiag":
        for nb in range(1, min(i, o) + 1):
            if i % nb == 0 and o % nb == 0:
                n = cls.param_count(i, o, nblocks=nb)
                if n <= limit and (best is None or n > best[0]):
                    best = (n, {"nblocks": nb})
    elif structure == "monarch":
        # 4 input blocks (large GEMMs), square-ish output blocks, the largest rank within the budget: the
        # fastest or near-fastest of the grid in benchmarks/e2e_hparams.py at MiniLM's shapes
        k = 4 if i % 4 == 0 else 1
        for l in (4 * max(1, o // i), 4):
            if k > 1 and o % l == 0:
                r = 0
                while cls.param_count(i, o, nblocks=k, out_blocks=l, rank=r + 1) <= limit:
                    r += 1
                if r:
                    best = (0, {"nblocks": k, "out_blocks": l, "rank": r})
                    break
    elif structure == "lrbd":
        for nb in range(1, min(i, o) + 1):
            if i % nb or o % nb:
                continue
            for r in range(min(i, o)):
                n = cls.param_count(i, o, rank=max(r, 1), nblocks=nb)
                if n > limit:
                    break
                key = (n, -nb)
                if r >= 1 and (best is None or key > best[0]):
                    best = (key, {"rank": r, "nblocks": nb})
    return None if best is None else best[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[128, 4096])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--structures", nargs="+", default=STRUCTURES)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-sample", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (robust on a loaded machine with --threads 1)")
    ap.add_argument("--keep-triton-probe", action="store_true",
                    help="leave deftly's per-call Triton availability probe in (forced backends)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    import deftly
    import deftly.kernels

    if not args.keep_triton_probe:
        # a forced backend re-evaluates every backend's availability on every call, and the Triton one runs
        # importlib.util.find_spec("triton") each time (~70 us CPU, ~0.6 ms wall on the loaded machine):
        # not what we want to time here (it is reported separately in docs/speed_e2e.md)
        from deftly.kernels import triton_kernels

        triton_kernels.available = lambda device=None: False
    from deftly.kernels import dispatch

    rows_out = []
    with torch.inference_mode():
        pass
    for (i, o) in SHAPES:
        dense = nn.Linear(i, o)
        for s in args.structures:
            from deftly.surgery import choose_hparams

            hp = choose_hparams(s, i, o, args.budget)[0]
            torch.manual_seed(0)
            layer = deftly.make(s, i, o, **hp).eval()
            for B in args.rows:
                x = torch.randn(B, i)
                res: dict[str, Any] = {"shape": f"{i}x{o}", "structure": s, "hparams": hp, "rows": B,
                                       "budget": args.budget}
                with torch.inference_mode():
                    layer(x)  # tune
                    chosen = dispatch.choose(layer, x, lambda z: z)
                    res["auto_backend"] = chosen
                    fns: dict[str, Callable[[], Any]] = {
                        "nn.Linear": lambda: dense(x),
                        "deftly": lambda: layer(x),
                    }
                    for be in dispatch.backends(s, x):
                        if be in ("triton", "kernel_strided"):
                            continue

                        def forced(be=be):
                            layer.kernel_backend = be
                            try:
                                return layer(x)
                            finally:
                                layer.kernel_backend = None
                        fns[f"deftly[{be}]"] = forced
                    mf = minimal_forward(layer)
                    if mf is not None:
                        ref = layer(x)
                        got = mf(x)
                        assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4), (s, i, o, (ref - got).abs().max())
                        fns["minimal"] = lambda: mf(x)
                    dv = divisor_variant(s, i, o, hp, args.budget)
                    if dv is not None and dv != hp:
                        torch.manual_seed(0)
                        l2 = deftly.make(s, i, o, **dv).eval()
                        mf2 = minimal_forward(l2)
                        if mf2 is not None:
                            fns["minimal divisor"] = lambda: mf2(x)
                            fns["deftly divisor"] = lambda: l2(x)
                            res["divisor_hparams"] = dv
                    # overhead pieces
                    x2 = x.reshape(-1, i)
                    fns["_check_input"] = lambda: layer._check_input(x)
                    fns["weight_dtype"] = lambda: layer.weight_dtype
                    fns["dispatch.choose"] = lambda: dispatch.choose(layer, x2, None)
                    fns["dispatch._state"] = lambda: dispatch._state(layer)
                    part = getattr(layer, "in_part", None) or getattr(getattr(layer, "blockdiag", None), "in_part", None)
                    if part is not None and not part.exact:
                        fns["in_part.pad"] = lambda: part.pad(x)
                    y0 = layer._matmul(x2)
                    if layer.bias is not None:
                        fns["bias add"] = lambda: y0 + layer.bias
                    fns["F.linear no bias"] = lambda: F.linear(x, dense.weight)
                    times = bench(fns, args.rounds, args.min_sample)
                res["us"] = {k: 1e6 * v for k, v in times.items()}
                res["flops_ratio"] = (2 * i * o) / layer.flop_count(i, o, **hp)
                rows_out.append(res)
                d = res["us"]["nn.Linear"]
                print(f"{i}x{o} {s:9s} rows={B:5d} {hp!s:55s} auto={chosen:7s} ideal {res['flops_ratio']:.1f}x | "
                      + "  ".join(f"{k}={v:.0f}us({d / v:.2f}x)" if k in ("deftly", "minimal", "minimal divisor")
                                  or k.startswith("deftly[") else f"{k}={v:.1f}us"
                                  for k, v in res["us"].items()), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows_out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
