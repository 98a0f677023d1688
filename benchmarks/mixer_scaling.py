"""Scaling of one long-convolution mixer block against causal attention, and the exactness of the long
convolution (issue 15).

    python benchmarks/mixer_scaling.py               # T = 256 .. 64K at 65,536 tokens per batch
    python benchmarks/mixer_scaling.py --quick       # smoke run (small sizes, a few seconds)
    python benchmarks/mixer_scaling.py --help        # sizes, threads, memory limit, output prefix

Timed (one process, the items of each length interleaved, rounds rotated so that a change of load from
other processes hits all alike): forward (autograd graph recorded, as in training) and forward + backward
(input and parameter gradients, a fixed output gradient) of

* ``mixer[torch]`` / ``mixer[monarch]`` — one :class:`deftly.mixers.MonarchMixer` block at its defaults
  (Monarch projections d -> 3d and d -> d, short depthwise conv, implicit Hyena filter, gates, long causal
  convolution) with the FFT by ``torch.fft`` or written as Monarch matmuls;
* ``conv[torch]`` / ``conv[monarch]`` — the long causal convolution alone (:func:`deftly.mixers.causal_conv`
  on ``d`` channels), the like-for-like of attention's sequence mixing;
* ``sdpa`` — ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` alone (``heads`` heads; its q/k/v
  and output projections are *not* included, so the comparison favours attention).

The batch is ``tokens / T`` (tokens per batch held constant). Peak memory: each (item, T) runs once more in
a fresh subprocess, which records its resident set size (``VmRSS``) after building the inputs, resets the
kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM`` after the forward and
after the backward: the peak *additional* resident memory of the step (all allocators, torch's included).
Attention is skipped where its estimated memory exceeds ``--mem-limit-gib`` or its time predicted from
the previous length exceeds ``--max-seconds`` (both said in the table).

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (default ``benchmarks/results/mixer_scaling``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ITEMS = ("mixer[torch]", "mixer[monarch]", "conv[torch]", "conv[monarch]", "sdpa")
LONG_S = 8.0  # a step longer than this is measured once (its first run), not warmed up and repeated
EXACT_T = list(range(1, 65)) + [97, 1000, 4096, 10007]


# ----------------------------------------------------------------------------- the timed steps
def make_case(item: str, T: int, d: int, heads: int, tokens: int, seed: int = 0):
    """``(forward, output gradient, leaves)`` for one item at length ``T`` (batch ``tokens // T``)."""
    import deftly.mixers as M

    torch.manual_seed(seed)
    B = max(1, tokens // T)
    if item == "sdpa":
        q, k, v = (torch.randn(B, heads, T, d // heads, requires_grad=True) for _ in range(3))
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), \
            torch.randn(B, heads, T, d // heads), (q, k, v)
    x, gy = torch.randn(B, T, d, requires_grad=True), torch.randn(B, T, d)
    fft = item[item.index("[") + 1:-1]
    if item.startswith("mixer"):
        m = M.MonarchMixer(d, T, fft=fft)
        return (lambda: m(x)), gy, (x, *m.parameters())
    filt = torch.randn(d, T, requires_grad=True)
    return (lambda: M.causal_conv(x, filt, fft=fft)), gy, (x, filt)


def build_step(item: str, T: int, d: int, heads: int, tokens: int, seed: int = 0):
    """``step() -> (forward seconds, forward+backward seconds)`` for one item at length ``T``."""
    fwd, gy, leaves = make_case(item, T, d, heads, tokens, seed)

    def step() -> tuple[float, float]:
        for p in leaves:
            p.grad = None
        t0 = time.perf_counter()
        y = fwd()
        t1 = time.perf_counter()
        y.backward(gy)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    return step


def sdpa_bytes(T: int, d: int, tokens: int) -> float:
    """Estimated peak bytes of one SDPA forward+backward: the flash-style CPU kernel keeps q, k, v, out,
    their gradients and the output gradient (8 tensors of tokens x d floats) plus per-row statistics; the
    math fallback would add the (B, heads, T, T) score matrix — counted when flash cannot run (T > 2^31 /
    tokens is never reached here)."""
    return 4.0 * (8 * tokens * d + 2 * tokens)


# ----------------------------------------------------------------------------- memory probe (subprocess)
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def probe(item: str, T: int, d: int, heads: int, tokens: int) -> dict:
    """Run in a fresh process: peak additional RSS (MiB) of one forward and of forward + backward, in steady
    state for the mixers (one warm-up step first: compiled kernels, FFT plans and buffer pools it creates
    are in the baseline, freed memory is returned to the OS by ``malloc_trim``); for sdpa a small warm-up
    problem starts the libraries and the measured one runs once."""
    if item == "sdpa":  # library start-up on a small problem; the large one runs cold (no caches to fill)
        f0, g0, _ = make_case(item, min(T, 256), d, heads, min(T, 256))
        f0().backward(g0)
        del f0, g0
    fwd, gy, leaves = make_case(item, T, d, heads, tokens)
    if item != "sdpa":
        fwd().backward(gy)
        for p in leaves:
            p.grad = None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _status_kib("VmRSS") or 0
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (high-water mark not reset: an upper bound)"

    def hwm() -> int:
        v = _status_kib("VmHWM")
        if v is None:
            import resource

            v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return v

    t0 = time.perf_counter()
    y = fwd()
    peak_fwd = hwm()
    y.backward(gy)
    peak = hwm()
    return {"item": item, "T": T, "base_mib": base / 1024, "fwd_mib": (peak_fwd - base) / 1024,
            "fwdbwd_mib": (peak - base) / 1024, "method": method, "fwdbwd_s": time.perf_counter() - t0}


def run_probe(item: str, T: int, args) -> dict:
    cmd = [sys.executable, __file__, "--probe", item, str(T), "--d", str(args.d), "--heads", str(args.heads),
           "--tokens", str(args.tokens), "--threads", str(args.threads_used)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_used))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"item": item, "T": T, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- exactness
def exactness(lengths: list[int], d: int = 4) -> dict:
    """Max relative error (max |y - y_ref| / max |y_ref|) of every FFT path against the direct O(T^2)
    convolution in float64; exact-zero future gradients and forward leakage at the largest length."""
    import deftly.mixers as M

    g = torch.Generator().manual_seed(0)
    rows = []
    for T in lengths:
        x = torch.randn(1, T, d, dtype=torch.float64, generator=g)
        k = torch.randn(d, T, dtype=torch.float64, generator=g)
        ref = M.direct_causal_conv(x, k)
        row = {"T": T}
        for path in M.FFT_PATHS:
            y = M.causal_conv(x, k, fft=path)
            row[path] = float((y - ref).abs().max() / ref.abs().max())
            row[f"n_{path}"] = M.fft_length(T, path)
        rows.append(row)
    # causality at the largest T: gradients of a few outputs w.r.t. future inputs; forward leakage
    T = max(lengths)
    x = torch.randn(2, T, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(d, T, dtype=torch.float64, generator=g)
    causal = {}
    for path in M.FFT_PATHS:
        y = M.causal_conv(x, k, fft=path)
        nonzero = 0
        ts = sorted({0, 1, T // 3, T // 2, T - 2})
        for t in ts:
            (gx,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
            nonzero += int((gx[:, t + 1:] != 0).sum())
        with torch.no_grad():  # change only the future of t0 and look at the past outputs
            t0 = T // 2
            x2 = x.detach().clone()
            x2[:, t0 + 1:] = torch.randn(2, T - t0 - 1, d, dtype=torch.float64, generator=g)
            y1, y2 = M.causal_conv(x.detach(), k, fft=path), M.causal_conv(x2, k, fft=path)
            leak = float((y1[:, : t0 + 1] - y2[:, : t0 + 1]).abs().max() / y1.abs().max())
        causal[path] = {"T": T, "outputs_checked": ts, "nonzero_future_gradients": nonzero,
                        "forward_leakage_rel": leak}
    return {"rows": rows, "causality": causal}


# ----------------------------------------------------------------------------- the scaling run
def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) vs log(T)."""
    pts = [(math.log(t), math.log(s)) for t, s in points if s and s > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def crossover(lengths: list[int], mine: dict, theirs: dict) -> dict:
    """First measured ``T`` from which ``mine`` stays faster than ``theirs``, and the log-log interpolated
    length where the ratio crosses 1."""
    common = [T for T in lengths if mine.get(T) and theirs.get(T)]
    faster_from = None
    for i, T in enumerate(common):
        if all(mine[u] < theirs[u] for u in common[i:]):
            faster_from = T
            break
    interp = None
    for a, b in itertools.pairwise(common):
        ra, rb = mine[a] / theirs[a], mine[b] / theirs[b]
        if ra >= 1 > rb:
            w = math.log(ra) / (math.log(ra) - math.log(rb))
            interp = math.exp(math.log(a) + w * (math.log(b) - math.log(a)))
    if common and mine[common[0]] < theirs[common[0]] and faster_from == common[0]:
        interp = None  # already faster at the shortest length measured
    return {"faster_from": faster_from, "interpolated": interp, "lengths": common}


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def measure(args) -> dict:
    lengths, items = args.lengths, args.items
    times: dict[str, dict[int, dict]] = {it: {} for it in items}
    notes: list[str] = []
    prev_sdpa: tuple[int, float] | None = None
    for T in lengths:
        steps = {}
        for it in items:
            if it == "sdpa":
                est = sdpa_bytes(T, args.d, args.tokens) / 2**30
                if est > args.mem_limit_gib:
                    times[it][T] = {"skipped": f"estimated {est:.1f} GiB > {args.mem_limit_gib:g} GiB"}
                    continue
                if prev_sdpa and args.max_seconds:
                    pred = prev_sdpa[1] * T / prev_sdpa[0]
                    if pred > args.max_seconds:
                        times[it][T] = {"skipped": f"predicted {pred:.0f} s > --max-seconds {args.max_seconds:g}"}
                        continue
            steps[it] = build_step(it, T, args.d, args.heads, args.tokens)
        # round 0 = warm-up (kept as the only measurement when it is long), then interleaved rounds
        runs: dict[str, list[tuple[float, float]]] = {it: [] for it in steps}
        first: dict[str, tuple[float, float]] = {}
        for it, step in steps.items():
            first[it] = step()
            print(f"  T={T:6d} {it:15s} first run fwd {first[it][0]:8.3f} s, fwd+bwd {first[it][1]:8.3f} s", flush=True)
            if it != "sdpa":  # first calls compile/plan (deftly's Monarch kernel, FFT plans): a second warm-up
                first[it] = step()
        short = [it for it in steps if first[it][1] < LONG_S]
        for r in range(args.rounds):
            order = short[r % len(short):] + short[: r % len(short)] if short else []
            for it in order:
                runs[it].append(steps[it]())
        for it in steps:
            rs = runs[it] or [first[it]]
            fwd = sorted(r[0] for r in rs)[len(rs) // 2]
            fb = sorted(r[1] for r in rs)[len(rs) // 2]
            times[it][T] = {"fwd_s": fwd, "fwdbwd_s": fb, "runs": len(rs), "warmed_up": bool(runs[it]) or it != "sdpa",
                            "batch": max(1, args.tokens // T)}
            if it == "sdpa":
                prev_sdpa = (T, fb)
        steps.clear()
        gc.collect()
    if any("skipped" in v for v in times.get("sdpa", {}).values()):
        notes.append("sdpa skipped where said: " + "; ".join(f"T={T}: {v['skipped']}" for T, v in
                                                              times["sdpa"].items() if "skipped" in v))
    return {"times": times, "notes": notes}


def summarize(args, res: dict, mem: dict) -> dict:
    times = res["times"]
    fit_lo, fit_hi = args.fit_range
    summary = {}
    for it in times:
        for mode in ("fwd_s", "fwdbwd_s"):
            pts = [(T, v[mode]) for T, v in times[it].items() if mode in v and fit_lo <= T <= fit_hi]
            b = fit_exponent(pts)
            summary.setdefault(it, {})[mode] = {
                "exponent_constant_tokens": b, "exponent_per_sequence": None if b is None else b + 1,
                "fit_points": [p[0] for p in pts]}
    cross = {}
    if "sdpa" in times:
        for it in times:
            if it == "sdpa":
                continue
            for mode in ("fwd_s", "fwdbwd_s"):
                mine = {T: v.get(mode) for T, v in times[it].items()}
                theirs = {T: v.get(mode) for T, v in times["sdpa"].items()}
                cross.setdefault(it, {})[mode] = crossover(args.lengths, mine, theirs)
    return {"exponents": summary, "crossover": cross}


# ----------------------------------------------------------------------------- report
def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def write_report(args, data: dict) -> str:
    out = Path(args.out)
    times, mem, ex = data["times"], data["memory"], data["exactness"]
    lines = [f"# Mixer scaling: one MonarchMixer block vs causal SDPA ({data['meta']['date']})", ""]
    m = data["meta"]
    lines += [f"Command: `{m['command']}`", "",
              (f"torch {m['torch']} ({m['cpu']}), {m['threads']} thread(s), allocator: {m['allocator']}; "
              f"d={args.d}, heads={args.heads}, {args.tokens:,} tokens per batch (batch = tokens / T); "
              f"load average {m['load_start']:.2f} at start, {m['load_end']:.2f} at end; total "
              f"{m['wall_s']:.0f} s."), ""]
    if ex:
        lines += ["## Exactness (float64, against the direct O(T^2) convolution)", "",
                  "max |y - y_ref| / max |y_ref| per FFT path (batch 1, 4 channels, N(0,1) signal and filter):", "",
                  "| T | torch | monarch | butterfly | FFT length (torch / monarch / butterfly) |", "|---|---|---|---|---|"]
        small = [r for r in ex["rows"] if r["T"] <= 64]
        if small:
            lines.append(f"| 1..64 (max of {len(small)}) | " + " | ".join(
                f"{max(r[p] for r in small):.1e}" for p in ("torch", "monarch", "butterfly")) + " | various |")
        for r in ex["rows"]:
            if r["T"] > 64:
                lines.append(f"| {r['T']} | " + " | ".join(f"{r[p]:.1e}" for p in ("torch", "monarch", "butterfly"))
                             + f" | {r['n_torch']} / {r['n_monarch']} / {r['n_butterfly']} |")
        worst = max(max(r[p] for p in ("torch", "monarch", "butterfly")) for r in ex["rows"])
        lines += ["", (f"Worst over all T and paths: {worst:.1e} (target <= 1e-10: "
                      f"{'met' if worst <= 1e-10 else 'MISSED'})."), ""]
        lines += ["Causality at T = " + str(next(iter(ex["causality"].values()))["T"]) + ": "
                  + "; ".join(f"{p}: {c['nonzero_future_gradients']} nonzero gradients d y[t] / d x[t' > t] "
                              f"over outputs t in {c['outputs_checked']}, forward leakage "
                              f"{c['forward_leakage_rel']:.1e} (past outputs' change when only the future "
                              f"changes, relative)" for p, c in ex["causality"].items()), ""]
    lines += ["## Time and peak memory", "",
              ("Median seconds per call (fwd: forward with autograd graph; f+b: forward + backward); "
               "`x sdpa`: sdpa's time / this item's (fwd+bwd); peak MiB: additional resident memory of one "
               "forward+backward in a fresh process (mixers: in steady state after one warm-up step; sdpa: "
               "after a small warm-up problem). runs: timed calls after the warm-up (the mixers always get "
               f"two warm-up calls); a call longer than {LONG_S:g} s is measured once (for the mixers its "
               "second, warm call; for sdpa its first call: `first call`)."), "",
              "| T | batch | item | fwd s | f+b s | x sdpa (f+b) | peak MiB (fwd / f+b) | runs |",
              "|---|---|---|---|---|---|---|---|"]
    for T in args.lengths:
        sd = times.get("sdpa", {}).get(T, {})
        for it in times:
            v = times[it].get(T)
            if v is None:
                continue
            mm = mem.get(f"{it}|{T}", {})
            mstr = (f"{mm['fwd_mib']:.0f} / {mm['fwdbwd_mib']:.0f}" if "fwd_mib" in mm
                    else ("error" if "error" in mm else "-"))
            if "skipped" in v:
                lines.append(f"| {T} | {max(1, args.tokens // T)} | {it} | skipped | {v['skipped']} | | | |")
                continue
            ratio = sd.get("fwdbwd_s") / v["fwdbwd_s"] if sd.get("fwdbwd_s") and it != "sdpa" else None
            lines.append(f"| {T} | {v['batch']} | {it} | {v['fwd_s']:.3f} | {v['fwdbwd_s']:.3f} | "
                         f"{_fmt(ratio, '.2f') + 'x' if ratio else '-'} | {mstr} | {v['runs']}"
                         f"{'' if v['warmed_up'] else ' (first call)'} |")
    lines += ["", f"## Fitted exponents (log-log least squares over T = {args.fit_range[0]}..{args.fit_range[1]})", "",
              ("At constant tokens per batch, time ~ T^b: b ~ 0 for an O(T log T) mixer (per-token cost "
              "~ log T), b ~ 1 for attention. Per sequence (fixed batch), time ~ T^(b+1): the target "
              "`exponent <= 1.2` applies to this one."), "",
              "| item | b (fwd) | b (f+b) | per-sequence exponent (fwd) | per-sequence exponent (f+b) | points |",
              "|---|---|---|---|---|---|"]
    for it, e in data["summary"]["exponents"].items():
        lines.append(f"| {it} | {_fmt(e['fwd_s']['exponent_constant_tokens'], '.2f')} | "
                     f"{_fmt(e['fwdbwd_s']['exponent_constant_tokens'], '.2f')} | "
                     f"{_fmt(e['fwd_s']['exponent_per_sequence'], '.2f')} | "
                     f"{_fmt(e['fwdbwd_s']['exponent_per_sequence'], '.2f')} | "
                     f"{', '.join(map(str, e['fwdbwd_s']['fit_points']))} |")
    if data["summary"]["crossover"]:
        lines += ["", "## Crossover with causal SDPA", "",
                  "| item | faster from T (fwd) | interpolated (fwd) | faster from T (f+b) | interpolated (f+b) |",
                  "|---|---|---|---|---|"]
        for it, c in data["summary"]["crossover"].items():
            f, fb = c["fwd_s"], c["fwdbwd_s"]
            lines.append(f"| {it} | {f['faster_from'] or 'never'} | {_fmt(f['interpolated'], '.0f')} | "
                         f"{fb['faster_from'] or 'never'} | {_fmt(fb['interpolated'], '.0f')} |")
    if data["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in data["notes"]]
    text = "\n".join(lines) + "\n"
    Path(str(out) + ".md").write_text(text)
    return text


def plot(args, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, mem = data["times"], data["memory"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, mode, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fwdbwd_s", "forward + backward")):
        for it in times:
            pts = sorted((T, v[mode]) for T, v in times[it].items() if mode in v)
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=it,
                          ls="--" if it.startswith("conv") else "-")
        ax.set_title(f"{title}, {args.tokens:,} tokens per batch")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("seconds per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for it in times:
        pts = sorted((int(k.split("|")[1]), v["fwdbwd_mib"]) for k, v in mem.items()
                     if k.split("|")[0] == it and "fwdbwd_mib" in v)
        if pts:
            ax.loglog([p[0] for p in pts], [max(p[1], 1e-1) for p in pts], "o-", label=it)
    ax.set_title("peak additional RSS, forward + backward")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    plt.close(fig)


ALLOCATORS = {"glibc": {}, "glibc-nommap": {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"},
              "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


def allocator() -> str:
    """The malloc configuration of this process (as ``deftly bench`` names them)."""
    name = "glibc"
    if "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        name = "glibc-nommap (GLIBC_TUNABLES: no mmap, no trim: freed memory is reused without page faults)"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        name += " + THP_MEM_ALLOC_ENABLE=1"
    if os.environ.get("LD_PRELOAD"):
        name += f" + LD_PRELOAD={os.environ['LD_PRELOAD']}"
    return name if name != "glibc" else "glibc (default settings)"


def reexec_with_allocator(args, argv) -> None:
    """Restart this script with the environment of ``--allocator`` (malloc reads it at start-up)."""
    env_add = ALLOCATORS[args.allocator]
    if all(os.environ.get(k) == v for k, v in env_add.items()):
        return
    env = dict(os.environ, **env_add)
    argv = list(sys.argv[1:] if argv is None else argv)
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)


def wait_quiet(limit: float, max_wait: float) -> None:
    t0 = time.monotonic()
    while load_average() > limit and time.monotonic() - t0 < max_wait:
        print(f"  waiting for load average {load_average():.2f} <= {limit} ...", flush=True)
        time.sleep(15)


def charlm_compare(attn_dir: str, mixer_dir: str, out: str) -> str:
    """Compare two ``deftly train charlm`` runs (``--mixer attention`` / ``--mixer monarch-mixer``, same other
    options): parameters, val bits/char at equal steps and at the attention run's training time (the
    recorded clock, interpolated in the mixer's history). Writes ``<out>.charlm.{md,json}``."""

    def load(d: str) -> dict:
        data = json.loads((Path(d) / "results.json").read_text())
        row = data["rows"][0]
        hist = data.get("histories", {}).get(row["structure"]) or row.get("history") or []
        return {"dir": d, "config": data.get("config", {}), "row": row, "history": hist,
                "command": data.get("command")}

    def at(hist: list, key: str, x: float) -> float | None:
        pts = [(h[key], h["val_bpc"]) for h in hist]
        if not pts or x > pts[-1][0] + 1e-9:
            return None
        prev = (0.0, pts[0][1])
        for px, py in pts:
            if px >= x:
                return py if px == prev[0] else prev[1] + (x - prev[0]) / (px - prev[0]) * (py - prev[1])
            prev = (px, py)
        return pts[-1][1]

    a, m = load(attn_dir), load(mixer_dir)
    steps = a["config"].get("steps")
    res = {"attention": a, "mixer": m, "steps": steps}
    for k, r in (("attention", a), ("mixer", m)):
        res[k + "_summary"] = {"params": r["row"]["params"], "train_time": r["row"]["train_time"],
                               "steps": r["row"]["steps"], "val_bpc_equal_steps": at(r["history"], "step", steps),
                               "final_val_bpc": r["history"][-1]["val_bpc"] if r["history"] else None,
                               "step_ms": r["row"].get("step_ms")}
    ta = a["row"]["train_time"]
    res["mixer_val_bpc_at_attention_time"] = at(m["history"], "train_time", ta)
    res["attention_val_bpc_at_mixer_time"] = at(a["history"], "train_time", m["row"]["train_time"])
    sa, sm = res["attention_summary"], res["mixer_summary"]
    rel = sm["val_bpc_equal_steps"] / sa["val_bpc_equal_steps"] - 1
    lines = ["| model | parameters | val bits/char @ step " + str(steps) + " | vs attention | training time (s, "
             + str(a["config"].get("clock", "wall")) + " clock) | median step ms |", "|---|---|---|---|---|---|",
             (f"| attention | {sa['params']:,} | {sa['val_bpc_equal_steps']:.4f} | - | {sa['train_time']:.0f} | "
             f"{_fmt(sa['step_ms'], '.0f')} |"),
             (f"| monarch-mixer | {sm['params']:,} | {sm['val_bpc_equal_steps']:.4f} | {rel:+.2%} | "
             f"{sm['train_time']:.0f} | {_fmt(sm['step_ms'], '.0f')} |"), ""]
    mt = res["mixer_val_bpc_at_attention_time"]
    if mt is not None:
        lines.append(f"Equal training time ({ta:.0f} s, the attention run's): mixer {mt:.4f} vs attention "
                     f"{sa['val_bpc_equal_steps']:.4f} bits/char ({mt / sa['val_bpc_equal_steps'] - 1:+.2%}).")
    else:
        at_m = res["attention_val_bpc_at_mixer_time"]
        lines.append(f"Equal training time: the mixer finished its {sm['steps']} steps in {sm['train_time']:.0f} s, "
                     f"before attention's {ta:.0f} s; attention at {sm['train_time']:.0f} s: "
                     f"{_fmt(at_m, '.4f')} bits/char vs the mixer's {sm['val_bpc_equal_steps']:.4f}.")
    text = "\n".join(lines) + "\n"
    Path(out + ".charlm.md").write_text(text)
    Path(out + ".charlm.json").write_text(json.dumps(res, indent=1, default=str))
    return text


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: T = 64, 256, 1024, d = 32, 4096 tokens")
    ap.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=None,
                    help="comma-separated T (default 256,1024,4096,16384,65536)")
    ap.add_argument("--items", type=lambda s: s.split(","), default=list(ITEMS), help=",".join(ITEMS))
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per batch (default 65536)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    ap.add_argument("--threads", default="auto", help="torch threads; auto: 2 if the load average is < 0.5, else 1")
    ap.add_argument("--mem-limit-gib", type=float, default=16.0)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="skip sdpa where its predicted fwd+bwd time exceeds this (default: never)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    ap.add_argument("--memory-items", type=lambda s: s.split(","), default=None,
                    help="items whose memory is probed (default: all)")
    ap.add_argument("--memory-max-seconds", type=float, default=None,
                    help="skip the memory probe of a configuration whose timed fwd+bwd took longer (said so)")
    ap.add_argument("--no-exactness", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the load average to drop below 1 before measuring")
    ap.add_argument("--allocator", choices=sorted(ALLOCATORS), default="glibc",
                    help="malloc settings for every item alike (default glibc as is; glibc-nommap keeps freed "
                         "memory, thp: torch's transparent huge pages)")
    ap.add_argument("--out", default=None, help="output prefix (default benchmarks/results/mixer_scaling[.quick])")
    ap.add_argument("--charlm", nargs=2, metavar=("ATTENTION_RUN", "MIXER_RUN"),
                    help="instead of timing: compare two `deftly train charlm` run directories (--mixer attention "
                         "and --mixer monarch-mixer) and write <out>.charlm.{md,json}")
    ap.add_argument("--rewrite", action="store_true",
                    help="rewrite <out>.md and <out>.png from <out>.json (no measurement)")
    ap.add_argument("--probe", nargs=2, metavar=("ITEM", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or [64, 256, 1024]
        args.d, args.heads, args.tokens, args.rounds = 32, 2, 4096, 1
        args.memory_items = args.memory_items or ["mixer[torch]", "sdpa"]
        args.exact_lengths = [1, 2, 3, 7, 64, 97]
        args.fit_range = (64, 1024)
    else:
        args.lengths = args.lengths or [256, 1024, 4096, 16384, 65536]
        args.exact_lengths = EXACT_T
        args.fit_range = (1024, 65536)
    args.out = args.out or ("benchmarks/results/mixer_scaling" + ("" if args.allocator == "glibc" else
                                                                   f".{args.allocator}") + (".quick" if args.quick else ""))
    bad = [i for i in args.items if i not in ITEMS]
    if bad:
        ap.error(f"unknown items {bad}; choose from {', '.join(ITEMS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.charlm:
        print(charlm_compare(args.charlm[0], args.charlm[1], args.out))
        return 0
    if args.rewrite:
        data = json.loads(Path(args.out + ".json").read_text())
        m = data["meta"]
        args.d, args.heads, args.tokens, args.lengths = m["d"], m["heads"], m["tokens"], m["lengths"]
        args.fit_range = tuple(m.get("fit_range", args.fit_range))
        data["times"] = {it: {int(T): v for T, v in d.items()} for it, d in data["times"].items()}
        data["summary"] = summarize(args, {"times": data["times"]}, data["memory"])
        Path(args.out + ".json").write_text(json.dumps(data, indent=1, default=str))
        print(write_report(args, data))
        plot(args, data)
        return 0
    if args.probe:
        torch.set_num_threads(int(args.threads))
        print(json.dumps(probe(args.probe[0], int(args.probe[1]), args.d, args.heads, args.tokens)))
        return 0
    reexec_with_allocator(args, argv)
    if args.wait_quiet:
        wait_quiet(1.0, args.wait_quiet)
    load0 = load_average()
    args.threads_used = (2 if load0 < 0.5 else 1) if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(args.threads_used)
    t0 = time.perf_counter()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ex = None
    if not args.no_exactness:
        print("exactness ...", flush=True)
        ex = exactness(args.exact_lengths)
    print(f"timing (threads={args.threads_used}, load {load0:.2f}) ...", flush=True)
    res = measure(args)
    memory = {}
    if not args.no_memory:
        print("memory (one subprocess per configuration) ...", flush=True)
        for T in (args.lengths[-1:] if args.quick else args.lengths):  # --quick: the largest T only
            for it in args.items:
                v = res["times"][it].get(T, {})
                if "skipped" in v or (args.memory_items and it not in args.memory_items):
                    continue
                if args.memory_max_seconds and v.get("fwdbwd_s", 0) > args.memory_max_seconds:
                    res["notes"].append(f"memory of {it} at T={T} not probed: its fwd+bwd took "
                                        f"{v['fwdbwd_s']:.0f} s > --memory-max-seconds {args.memory_max_seconds:g}")
                    continue
                memory[f"{it}|{T}"] = run_probe(it, T, args)
                print(f"  T={T:6d} {it:15s} {memory[f'{it}|{T}'].get('fwdbwd_mib', 'error')}", flush=True)
    cmd = "python benchmarks/mixer_scaling.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "command": cmd.strip(), "torch": torch.__version__,
                     "cpu": platform.processor() or platform.machine(), "threads": args.threads_used,
                     "allocator": allocator(), "load_start": load0, "load_end": load_average(),
                     "wall_s": time.perf_counter() - t0, "d": args.d, "heads": args.heads, "tokens": args.tokens,
                     "lengths": args.lengths, "fit_range": list(args.fit_range), "rounds": args.rounds,
                     "long_s": LONG_S},
            "exactness": ex, "times": res["times"], "memory": memory, "notes": res["notes"]}
    data["summary"] = summarize(args, res, memory)
    Path(args.out + ".json").write_text(json.dumps(data, indent=1, default=str))
    text = write_report(args, data)
    plot(args, data)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
