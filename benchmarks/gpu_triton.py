"""GPU check and benchmark of deftly's Triton kernels (Monarch, block-diagonal) against ``nn.Linear``.

    python benchmarks/gpu_triton.py                 # on a CUDA machine with triton installed
    TRITON_INTERPRET=1 python benchmarks/gpu_triton.py --smoke --device cpu   # tiny sizes, interpreter

1. Correctness on the device: every registered structure's forward and backward against its own
   ``to_dense()`` (fp32), and the Triton backends (forced) against the float64 reference in fp32 and
   bf16, forward and backward, at small odd shapes and at n = 4096.
2. Speed: median time (CUDA events, after warm-up) of forward and forward+backward at n = 4096 with
   nblocks = 64, fp32 (IEEE, no TF32, for ``nn.Linear`` too) and bf16, for ``nn.Linear``, deftly's
   batched-matmul kernel (``"kernel"``) and the Triton kernel (``"triton"``; with the largest tile side
   64 and 128, best kept), with the speed-up vs ``nn.Linear`` and the ideal (FLOP ratio).

Writes ``OUT.json`` and ``OUT.md`` (``--out``, default ``benchmarks/results/gpu_triton``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import deftly
from deftly.kernels import triton_kernels as T


def _timer(device: torch.device):
    def run(fn, reps: int = 30, warmup: int = 5) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def check_structures(device, log) -> list[dict]:
    rows = []
    for name in deftly.structures():
        ex = deftly.get(name).examples(24, 40)[0]
        torch.manual_seed(0)
        layer = deftly.make(name, 24, 40, device=device, **ex)
        x = torch.randn(5, 24, device=device, requires_grad=True)
        y = layer(x)
        dense = layer.to_dense()
        ref = x @ dense.T.to(x.dtype) if not dense.is_complex() else (x.to(dense.dtype) @ dense.T)
        if ref.is_complex() and not y.is_complex():
            ref = ref.real
        if layer.bias is not None:
            ref = ref + layer.bias
        err = float(((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).detach())
        g = torch.autograd.grad(y.real.sum() if y.is_complex() else y.sum(), x)[0]
        ok = err < 1e-4 and bool(torch.isfinite(g).all())
        rows.append({"structure": name, "hparams": {k: str(v) for k, v in ex.items()}, "rel_err": err, "ok": ok})
        log(f"  {name:13s} fwd rel err vs to_dense {err:.1e}  grad finite {bool(torch.isfinite(g).all())}")
    return rows


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check_triton(device, shapes, log) -> list[dict]:
    rows = []
    for name, i, o, hp in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            layer = deftly.make(name, i, o, device=device, dtype=torch.float64, **hp)
            x64 = torch.randn(33, i, device=device, dtype=torch.float64, requires_grad=True)
            ref = layer.reference_forward(x64)
            g64 = torch.randn_like(ref)
            want = torch.autograd.grad(ref, [x64, *layer.parameters()], g64)
            low = deftly.make(name, i, o, device=device, dtype=dtype, **hp)
            low.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
            low.kernel_backend = "triton"
            x = x64.detach().to(dtype).requires_grad_(True)
            y = low(x)
            got = torch.autograd.grad(y, [x, *low.parameters()], g64.to(dtype))
            errs = [_rel(y, ref)] + [_rel(a, b) for a, b in zip(got, want)]
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            ok = max(errs) < tol
            rows.append({"structure": name, "size": f"{i}x{o}", "hparams": hp, "dtype": str(dtype).split(".")[-1],
                         "rel_err_fwd": errs[0], "rel_err_grads": errs[1:], "tol": tol, "ok": ok})
            log(f"  triton {name:9s} {i}x{o} {dtype!s:15s} fwd {errs[0]:.1e}  grads "
                f"{' '.join(f'{e:.1e}' for e in errs[1:])}  {'ok' if ok else 'FAIL'}")
    return rows


def bench(device, n, batches, dtypes, nblocks, log) -> list[dict]:
    run = _timer(device)
    rows = []
    caps = (64, 128)
    orig_cap = T.TILE_CAP
    for dtype in dtypes:
        for batch in batches:
            torch.manual_seed(0)
            x = torch.randn(batch, n, device=device, dtype=dtype)
            w = torch.randn(n, n, device=device, dtype=dtype) / n ** 0.5
            g = torch.randn(batch, n, device=device, dtype=dtype)
            for mode in ("fwd", "fwdbwd"):
                def lin(mode=mode, x=x, w=w, g=g):  # bound now: the loop moves on
                    if mode == "fwd":
                        with torch.no_grad():
                            F.linear(x, w)
                    else:
                        xr = x.detach().requires_grad_(True)
                        wr = w.detach().requires_grad_(True)
                        torch.autograd.grad(F.linear(xr, wr), [xr, wr], g)
                t_lin = run(lin)
                dense_flops = 2 * batch * n * n * (3 if mode == "fwdbwd" else 1)
                rows.append({"impl": "nn.Linear", "structure": "dense", "n": n, "batch": batch,
                             "dtype": str(dtype).split(".")[-1], "mode": mode, "ms": t_lin,
                             "tflops": dense_flops / t_lin / 1e9, "speedup": 1.0, "ideal": 1.0})
                for name, hp in (("monarch", {"nblocks": nblocks}), ("blockdiag", {"nblocks": nblocks})):
                    layer = deftly.make(name, n, n, bias=False, device=device, dtype=dtype, **hp)
                    ideal = (2 * n * n) / layer.flops(1)
                    flops = layer.flops(batch) * (3 if mode == "fwdbwd" else 1)
                    for backend in ("kernel", "triton"):
                        layer.kernel_backend = backend

                        def fn(mode=mode, layer=layer, x=x, g=g):  # bound now: the loop moves on
                            if mode == "fwd":
                                with torch.no_grad():
                                    layer(x)
                            else:
                                xr = x.detach().requires_grad_(True)
                                torch.autograd.grad(layer(xr), [xr, *layer.parameters()], g)
                        if backend == "triton":
                            best, best_cap = float("inf"), None
                            for cap in caps:
                                T.TILE_CAP = cap
                                try:
                                    t = run(fn)
                                except Exception as err:  # noqa: BLE001 - a tile too large for shared memory, say
                                    log(f"    triton cap {cap}: {type(err).__name__}: {str(err)[:120]}")
                                    continue
                                finally:
                                    T.TILE_CAP = orig_cap
                                if t < best:
                                    best, best_cap = t, cap
                            t, extra = best, {"tile_cap": best_cap}
                        else:
                            t, extra = run(fn), {}
                        rows.append({"impl": backend, "structure": name, "n": n, "batch": batch,
                                     "dtype": str(dtype).split(".")[-1], "mode": mode, "ms": t,
                                     "tflops": flops / t / 1e9, "speedup": t_lin / t, "ideal": ideal,
                                     "pct_ideal": 100 * t_lin / t / ideal, **extra})
                        r = rows[-1]
                        log(f"  {r['dtype']:8s} {mode:6s} B={batch:6d} {name:9s} {backend:6s} {t:8.3f} ms "
                            f"(Linear {t_lin:8.3f})  {r['speedup']:6.2f}x of ideal {ideal:5.1f}x "
                            f"({r['pct_ideal']:4.0f}%)  {r['tflops']:7.2f} TFLOP/s {extra}")
    return rows


def _md(res: dict) -> str:
    lines = [f"# Triton kernels on {res['device_name']}", "", (f"`{res['command']}` — torch {res['torch']}, "
                                                               f"triton {res['triton']}, {res['date']}"),
             "", "## Correctness (rel. max error vs float64 reference)", "",
             "| structure | size | dtype | fwd | grads (x, params) | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["triton_checks"]:
        lines.append(f"| {r['structure']} | {r['size']} | {r['dtype']} | {r['rel_err_fwd']:.1e} | "
                     f"{' '.join(f'{e:.1e}' for e in r['rel_err_grads'])} | {r['ok']} |")
    lines += ["", (f"Every registered structure on the device vs its `to_dense()`: "
                   f"{sum(r['ok'] for r in res['structures'])}/{len(res['structures'])} ok "
                   f"(max rel err {max(r['rel_err'] for r in res['structures']):.1e})."), "",
              "## Speed (median ms, CUDA events)", "",
              "| dtype | mode | batch | structure | impl | ms | nn.Linear ms | speed-up | ideal | % ideal | TFLOP/s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lin = {(r["dtype"], r["mode"], r["batch"]): r["ms"] for r in res["bench"] if r["impl"] == "nn.Linear"}
    for r in res["bench"]:
        if r["impl"] == "nn.Linear":
            continue
        lines.append(f"| {r['dtype']} | {r['mode']} | {r['batch']} | {r['structure']} | {r['impl']} | "
                     f"{r['ms']:.3f} | {lin[(r['dtype'], r['mode'], r['batch'])]:.3f} | {r['speedup']:.2f}x | "
                     f"{r['ideal']:.1f}x | {r['pct_ideal']:.0f}% | {r['tflops']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter check of this script)")
    ap.add_argument("--out", default="benchmarks/results/gpu_triton")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_triton: no CUDA device here; run it on a GPU machine (or --smoke --device cpu with "
              "TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if not T.available(device):
        print("gpu_triton: triton is not importable for this device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def log(s):
        print(s, flush=True)

    import triton

    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    log(f"{res['device_name']}, torch {res['torch']}, triton {res['triton']}")
    log("every structure vs to_dense on the device:")
    res["structures"] = check_structures(device, log)
    shapes = [("monarch", 12, 20, {"nblocks": 3, "out_blocks": 2, "rank": 2}), ("monarch", 40, 24, {"nblocks": 4}),
              ("blockdiag", 12, 20, {"nblocks": 3}), ("blockdiag", 45, 30, {"nblocks": 5})]
    if not args.smoke:
        shapes += [("monarch", 4096, 4096, {"nblocks": 64}), ("blockdiag", 4096, 4096, {"nblocks": 64}),
                   ("monarch", 1024, 4096, {"nblocks": 32})]
    log("triton backends vs the float64 reference:")
    res["triton_checks"] = check_triton(device, shapes, log)
    log("speed:")
    if args.smoke:
        res["bench"] = bench(device, 64, [8], [torch.float32], 4, log)
    else:
        res["bench"] = bench(device, 4096, [2048, 16384], [torch.float32, torch.bfloat16], 64, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(_md(res))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    bad = [r for r in res["triton_checks"] + res["structures"] if not r["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
