"""Numerical stability of the FFT as a product of sparse factors, measured.

For n = 2^4 .. 2^14 this measures the relative error ``||y - y_ref||_2 / ||y_ref||_2`` (mean over a batch
of inputs) of

  (a) deftly's factorised FFT (``deftly.transforms.dft``: bit reversal + log2 n butterfly stages),
  (b) the dense DFT matrix times the input (one matmul, entries rounded to the working precision),
  (c) ``torch.fft.fft`` (pocketfft on CPU),

in complex64 (float32 parts), and (a)/(b) in bfloat16 (torch has no complex bfloat16: real and imaginary
parts are carried as bf16 pairs, ``Radix2.apply_real_pairs``; torch.fft has no bf16 on CPU). The
reference is ``numpy.fft.fft`` in complex128 of the *same rounded* input, so only the transform's own
rounding is measured. Inputs: ``random`` (complex Gaussian), ``tones`` (three complex exponentials, a
sparse spectrum) and ``step`` (a real unit step, a slowly decaying spectrum). Growth rates are the
least-squares slope of log2(error) against log2(n): theory (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., sec. 24.1) gives an error bound growing like log2 n for the FFT (rms: slope ~0)
and like n for the dense sum (rms ~sqrt n: slope ~0.5; blocked/pairwise summation inside a GEMM lowers it).
A second table runs (a) on sizes that are not powers of two (mixed radix, Bluestein).

Run: ``python benchmarks/stability.py`` (about a minute or two on 2 cores); writes
``benchmarks/results/stability.{md,png,json}``. ``--max-log2 10`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

import deftly
from deftly.transforms import dft

HERE = Path(__file__).resolve().parent
KINDS = ("random", "tones", "step")
METHODS = [("deftly", "complex64"), ("dense", "complex64"), ("torch.fft", "complex64"),
           ("deftly", "bfloat16"), ("dense", "bfloat16")]


def make_inputs(n: int, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``(batch, n)`` complex128 inputs of each kind."""
    j = torch.arange(n, dtype=torch.float64)
    rnd = torch.complex(torch.randn(batch, n, generator=gen, dtype=torch.float64),
                        torch.randn(batch, n, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    freqs = torch.randint(0, n, (batch, 3), generator=gen).to(torch.float64)
    amps = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    ang = 2 * math.pi * freqs.unsqueeze(-1) * j / n  # (batch, 3, n)
    tones = (amps.unsqueeze(-1) * torch.polar(torch.ones_like(ang), ang)).sum(1)
    cut = torch.randint(1, n, (batch, 1), generator=gen)
    step = (torch.arange(n).unsqueeze(0) < cut).to(torch.complex128)
    return {"random": rnd, "tones": tones, "step": step}


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))


def dense_apply(x64: torch.Tensor, xb: tuple[torch.Tensor, torch.Tensor], chunk: int = 1024):
    """Dense DFT matmul, row chunks of the matrix built in float64 then rounded: complex64 ``x64 @ W.T``
    and the bf16 real-pair product of ``xb = (re, im)``."""
    n = x64.shape[-1]
    out64 = torch.empty_like(x64)
    outr = torch.empty(xb[0].shape, dtype=torch.float32)
    outi = torch.empty_like(outr)
    j = torch.arange(n)
    for r0 in range(0, n, chunk):
        k = torch.arange(r0, min(n, r0 + chunk))
        e = torch.remainder(k.unsqueeze(1) * j.unsqueeze(0), n).to(torch.float64)  # exact exponents
        ang = (-2 * math.pi / n) * e
        W = torch.polar(torch.ones_like(ang), ang)  # (rows, n) complex128
        out64[:, r0:r0 + len(k)] = x64 @ W.to(torch.complex64).T
        wr, wi = W.real.to(torch.bfloat16), W.imag.to(torch.bfloat16)
        xr, xi = xb
        outr[:, r0:r0 + len(k)] = (xr @ wr.T - xi @ wi.T).float()
        outi[:, r0:r0 + len(k)] = (xr @ wi.T + xi @ wr.T).float()
    return out64, torch.complex(outr, outi)


def measure(n: int, batch: int, gen: torch.Generator) -> dict:
    inputs = make_inputs(n, batch, gen)
    names = list(inputs)
    x = torch.cat([inputs[k] for k in names])  # (3 batch, n)
    x64 = x.to(torch.complex64)
    xb = (x.real.to(torch.bfloat16), x.imag.to(torch.bfloat16))
    ref64 = np.fft.fft(x64.to(torch.complex128).numpy(), axis=-1)
    refb = np.fft.fft(torch.complex(xb[0].double(), xb[1].double()).numpy(), axis=-1)
    F = dft(n, dtype=torch.complex64)
    radix2 = F.ops[0]
    with torch.no_grad():
        y = {("deftly", "complex64"): F(x64)}
        re, im = radix2.apply_real_pairs(xb[0].T.contiguous(), xb[1].T.contiguous())
        y[("deftly", "bfloat16")] = torch.complex(re.T.float(), im.T.float())
        y[("dense", "complex64")], y[("dense", "bfloat16")] = dense_apply(x64, xb)
        y[("torch.fft", "complex64")] = torch.fft.fft(x64)
    out = {}
    for (method, dt), val in y.items():
        ref = refb if dt == "bfloat16" else ref64
        arr = val.to(torch.complex128).numpy()
        out[f"{method}/{dt}"] = {k: rel_err(arr[i * batch:(i + 1) * batch], ref[i * batch:(i + 1) * batch])
                                 for i, k in enumerate(names)}
    return out


def slope(ns: list[int], errs: list[float]) -> float:
    return float(np.polyfit(np.log2(ns), np.log2(errs), 1)[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-log2", type=int, default=4)
    ap.add_argument("--max-log2", type=int, default=14)
    ap.add_argument("--batch", type=int, default=8, help="inputs of each kind per size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    ns = [1 << k for k in range(args.min_log2, args.max_log2 + 1)]
    data = {}
    for n in ns:
        t = time.perf_counter()
        data[n] = measure(n, args.batch, gen)
        print(f"n={n:6d}  " + "  ".join(f"{m}:{data[n][m]['random']:.2e}" for m in data[n])
              + f"  ({time.perf_counter() - t:.1f}s)", flush=True)

    cols = [f"{m}/{d}" for m, d in METHODS]
    slopes = {c: {k: slope(ns, [data[n][c][k] for n in ns]) for k in KINDS} for c in cols}

    # any-n: mixed radix and Bluestein in complex64 against torch.fft
    any_n = [100, 210, 1000, 1009, 3 * 1024, 4099, 10000]
    any_rows = []
    for n in any_n:
        x = make_inputs(n, args.batch, gen)["random"].to(torch.complex64)
        ref = np.fft.fft(x.to(torch.complex128).numpy(), axis=-1)
        F = dft(n, dtype=torch.complex64)
        plan = "bluestein" if any(type(m).__name__ == "Bluestein" for m in F.modules()) else "mixed radix"
        with torch.no_grad():
            e_d = rel_err(F(x).to(torch.complex128).numpy(), ref)
            e_t = rel_err(torch.fft.fft(x).to(torch.complex128).numpy(), ref)
        any_rows.append({"n": n, "plan": plan, "deftly": e_d, "torch.fft": e_t,
                         "flops_per_row": F.flops(), "flops_over_nlog2n": F.flops() / (n * math.log2(n))})

    elapsed = time.perf_counter() - t0
    env = {"torch": torch.__version__, "numpy": np.__version__, "deftly": deftly.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "batch_per_kind": args.batch, "seconds": round(elapsed, 1)}
    (args.out / "stability.json").write_text(json.dumps(
        {"env": env, "sizes": ns, "errors": {str(n): data[n] for n in ns}, "slopes": slopes,
         "any_n": any_rows}, indent=1))

    lines = ["# FFT stability: factorised vs dense vs torch.fft", "",
             (f"Mean relative error `||y - y_ref|| / ||y_ref||` against numpy.fft in complex128 of the same "
              f"rounded input, {args.batch} inputs per kind and size. Produced by "
              f"`python benchmarks/stability.py` ({elapsed:.0f} s, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads). bf16 = real/imaginary bf16 pairs."), ""]
    for kind in KINDS:
        lines += [f"## Input: {kind}", "", "| n | " + " | ".join(cols) + " |",
                  "|---:|" + "---:|" * len(cols)]
        for n in ns:
            lines.append(f"| {n} | " + " | ".join(f"{data[n][c][kind]:.2e}" for c in cols) + " |")
        lines.append("| **slope** | " + " | ".join(f"**{slopes[c][kind]:+.2f}**" for c in cols) + " |")
        lines.append("")
    lines += [("Slope = least-squares slope of log2(error) vs log2(n) over the sizes above "
               "(0: no growth, 0.5: ~sqrt(n), 1: ~n)."), "",
              "## Sizes that are not powers of two (deftly complex64, random input)", "",
              "| n | plan | deftly | torch.fft | FLOPs/row | FLOPs/(n log2 n) |", "|---:|---|---:|---:|---:|---:|"]
    for r in any_rows:
        lines.append(f"| {r['n']} | {r['plan']} | {r['deftly']:.2e} | {r['torch.fft']:.2e} | "
                     f"{r['flops_per_row']} | {r['flops_over_nlog2n']:.1f} |")
    vs_fft = [data[n]["deftly/complex64"][k] / data[n]["torch.fft/complex64"][k] for n in ns for k in KINDS]
    vs_dense = [data[ns[-1]]["dense/complex64"][k] / data[ns[-1]]["deftly/complex64"][k] for k in KINDS]
    lines += ["", "## Reading the numbers", "",
              (f"- complex64: deftly's error / torch.fft's error lies in [{min(vs_fft):.2f}, "
               f"{max(vs_fft):.2f}] over all sizes and inputs; at n = {ns[-1]} the dense matmul's error is "
               f"{min(vs_dense):.1f}-{max(vs_dense):.1f}x deftly's."),
              ("- bfloat16: deftly's bf16 path rounds after every one of the log2 n stages; torch's CPU bf16 "
               "matmul rounds W and x to bf16 but accumulates each dot product in higher precision and "
               "rounds once (a sum of 4096 bf16 ones returns 4096, where bf16 accumulation would stop at "
               "256), so the dense bf16 error is flat in n. Compare the two bf16 columns with that in mind."),
              "- Non-power-of-two sizes use mixed radix or Bluestein (second table)."]
    (args.out / "stability.md").write_text("\n".join(lines) + "\n")

    print("\ngrowth rates (slope of log2 error vs log2 n):")
    for c in cols:
        print(f"  {c:22s} " + "  ".join(f"{k}={slopes[c][k]:+.2f}" for k in KINDS))
    print("\nnot powers of two (complex64, random): "
          + ", ".join(f"n={r['n']} {r['plan']} {r['deftly']:.1e} (torch.fft {r['torch.fft']:.1e})"
                      for r in any_rows))

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(KINDS), figsize=(5 * len(KINDS), 4.2), sharey=True)
        colors = {"deftly": "tab:blue", "dense": "tab:orange", "torch.fft": "tab:green"}
        markers = {"deftly": "o", "dense": "s", "torch.fft": "^"}
        for ax, kind in zip(axes, KINDS):
            for c in cols:
                method, dt = c.split("/")
                ax.loglog(ns, [data[n][c][kind] for n in ns], marker=markers[method], base=2,
                          color=colors[method], linestyle="-" if dt == "complex64" else "--",
                          alpha=1.0 if dt == "complex64" else 0.7,
                          label=f"{method} {dt} (slope {slopes[c][kind]:+.2f})")
            ax.legend(fontsize=7, loc="center")  # the band between the fp32 and bf16 curves is empty
            ax.set_title(f"input: {kind}")
            ax.set_xlabel("n")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("relative error vs float64")
        fig.suptitle("FFT as sparse factors (deftly) vs dense DFT matmul vs torch.fft")
        fig.tight_layout()
        fig.savefig(args.out / "stability.png", dpi=120)
    print(f"\nwrote {args.out / 'stability.md'}, .json" + ("" if args.no_plot else ", .png")
          + f" in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
