"""Tables, plots and files of a suite result."""

from __future__ import annotations

import json
import os
from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    alloc = any("allocator" in r for r in rows)
    head = ["size", "dtype", "mode", "batch", "structure", "backend", "ms", "nn.Linear ms", "GFLOP/s",
            "speed-up", "(min)", "ideal", "% ideal", "peak MB", "Linear MB"]
    if alloc:
        head.insert(0, "allocator")
    body = []
    for r in rows:
        mb = lambda v: "-" if v is None else f"{v / 2 ** 20:.1f}"
        body.append(([r.get("allocator", "")] if alloc else []) + [
                     r["size"], r["dtype"].replace("float32", "fp32").replace("bfloat16", "bf16"), r["mode"],
                     str(r["batch"]), r["structure"], str(r.get("backend", "")), f"{r['time_ms']:.3f}",
                     f"{r['dense_time_ms']:.3f}", f"{r['gflops']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r.get('speedup_min', float('nan')):.2f}x",
                     f"{r['ideal']:.1f}x", f"{100 * r['fraction']:.0f}%", mb(r["peak_mem_bytes"]),
                     mb(r["dense_peak_mem_bytes"])])
    if not body:
        return "(no rows)"
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        nleft = 7 if alloc else 6
        return "  ".join(c.ljust(w) if i < nleft else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        status = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        lines.append(f"[{status}] {t['target']}\n          {t['measured']}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, dtype: str = "float32") -> None:
    """Speed-up vs batch per structure (one panel per size and mode), each structure's ideal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["dtype"] == dtype and "@" not in r["structure"]]
    sizes = sorted({r["size"] for r in rows}, key=lambda s: tuple(map(int, s.split("x"))))
    modes = [m for m in ("fwd", "fwdbwd") if any(r["mode"] == m for r in rows)]
    if not rows:
        return
    fig, axes = plt.subplots(len(modes), len(sizes), figsize=(5.2 * len(sizes), 4.2 * len(modes)),
                             squeeze=False)
    names = sorted({r["structure"] for r in rows})
    cmap = plt.get_cmap("tab20")
    colors = {n: cmap(i % 20) for i, n in enumerate(names)}
    for mi, mode in enumerate(modes):
        for si, size in enumerate(sizes):
            ax = axes[mi][si]
            for n in names:
                rs = sorted((r for r in rows if r["structure"] == n and r["size"] == size and r["mode"] == mode),
                            key=lambda r: r["batch"])
                if not rs:
                    continue
                bs = [r["batch"] for r in rs]
                ax.plot(bs, [r["speedup"] for r in rs], "o-", color=colors[n], label=n, lw=1.5, ms=4)
                ax.plot([bs[0], bs[-1]], [rs[0]["ideal"]] * 2, "--", color=colors[n], lw=0.9, alpha=0.8)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel("speed-up vs nn.Linear")
            ax.set_title(f"{size}, {dtype}, {'forward' if mode == 'fwd' else 'forward+backward'}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("deftly: measured speed-up (solid) and ideal FLOP ratio (dashed) vs nn.Linear", fontsize=11)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write(result: dict[str, Any], prefix: str, png: bool = True) -> list[str]:
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    paths = [prefix + ".json", prefix + ".txt"]
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(prefix + ".txt", "w") as f:
        f.write(report(result) + "\n")
    if png and result["rows"]:
        rows = result["rows"]
        first = rows[0].get("allocator")
        plot([r for r in rows if r.get("allocator") == first], prefix + ".png")
        paths.append(prefix + ".png")
    return paths


def report(result: dict[str, Any]) -> str:
    m = result["meta"]
    hp = "\n".join(f"  {k}: {v}" for k, v in sorted(m.get("hparams", {}).items()))
    head = (f"deftly bench: torch {m['torch']}, {m['threads']} threads, {m['cpu']}, {m['capability']}, "
            f"{m['blas']}, allocator {m['allocator']}\n"
            f"load average (1 min): {m['load_start']:.2f} at start, {m.get('load_end', float('nan')):.2f} at end; "
            f"started {m['started']}\ncommand: {m['command']}")
    if "bf16_check" in m:
        c = m["bf16_check"]
        head += (f"\nbf16 check: fp32 matmul {c['float32_gflops']:.0f} GFLOP/s, bf16 {c['bfloat16_gflops']:.0f} "
                 f"GFLOP/s -> bf16 {'run' if c['bf16_fast'] else 'skipped'}")
    if m.get("peers"):
        head += "\npeers: " + ", ".join(f"{k} {v}" for k, v in m["peers"].items())
    parts = [head, "hyperparameters:\n" + hp, format_table(result["rows"])]
    if result.get("by_allocator"):
        for alloc, sub in result["by_allocator"].items():
            parts.append(f"targets ({alloc}):\n" + format_targets(sub["targets"]))
    elif result.get("targets"):
        parts.append("targets:\n" + format_targets(result["targets"]))
    return "\n\n".join(parts)
