"""The speed targets of the issues, evaluated on the rows of a suite result (``python benchmarks/bench.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four targets of issue #6 and issue #14's Monarch-vs-fly line, from the rows that exist (missing
    rows are reported as such)."""
    def find(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    out = []
    r = find(structure="monarch", size="4096x4096", batch=2048, dtype="float32", mode="fwdbwd")
    out.append(_target("Monarch nblocks=sqrt(n), n=4096, batch 2048, fp32, fwd+bwd: >= 16x vs nn.Linear "
                       "and >= 50% of ideal", r,
                       lambda x: x["speedup"] >= 16 and x["fraction"] >= 0.5,
                       lambda x: f"{x['speedup']:.1f}x vs nn.Linear ({x['time_ms']:.1f} vs "
                                 f"{x['dense_time_ms']:.1f} ms), ideal {x['ideal']:.1f}x, "
                                 f"{100 * x['fraction']:.0f}% of ideal"))
    for b in (2048, 64):
        r = find(structure="blockdiag", size="4096x4096", batch=b, dtype="float32", mode="fwdbwd")
        r = [x for x in r if x["hparams"].get("nblocks") == 64]
        out.append(_target(f"block-diagonal 64 blocks, n=4096, batch {b}, fp32, fwd+bwd: >= 70% of nn.Linear's "
                           "GFLOP/s", r, lambda x: x["fraction"] >= 0.7,
                           lambda x: f"{x['gflops']:.0f} vs {x['dense_gflops']:.0f} GFLOP/s = "
                                     f"{100 * x['fraction']:.0f}%"))
    b1 = [x for x in rows if x["batch"] == 1 and "@" not in x["structure"] and "." not in x["structure"]]
    slow = [x for x in b1 if x["speedup"] < 1.0]
    out.append({"target": "no structure slower than nn.Linear at batch 1 (every size, dtype, mode; dispatch "
                          "on)", "rows": len(b1), "met": (not slow) if b1 else None,
                "measured": (f"{len(b1) - len(slow)}/{len(b1)} rows >= 1.0x; slowest: " + ", ".join(
                    f"{x['structure']} {x['size']} {x['dtype']} {x['mode']} {x['speedup']:.2f}x "
                    f"[{x.get('backend')}]" for x in sorted(b1, key=lambda x: x['speedup'])[:4]))
                if b1 else "no batch-1 rows"})
    r = find(structure="butterfly[fft]", size="4096x4096", batch=64, dtype="float32", mode="fwd")
    out.append(_target("exact butterfly FFT, n=4096, batch 64, forward: <= 3 ms", r,
                       lambda x: x["time_ms"] <= 3.0,
                       lambda x: f"{x['time_ms']:.2f} ms (nn.Linear {x['dense_time_ms']:.2f} ms) [{x.get('backend')}]"))
    out.append(_fly_target(find))
    return out


def _fly_target(find: Callable[..., list[dict[str, Any]]]) -> dict[str, Any]:
    """Issue #14: deftly's Monarch (64 blocks) vs fly's two-bmm algorithm (the ``fly.monarch`` peer row)
    at every batch; the ratio is of the two rows' speedups over their own interleaved nn.Linear (so load
    drift between the rows cancels), the times are shown beside it."""
    text = "Monarch vs fly's two-bmm, n=4096, fp32 fwd+bwd, batch 1/64/2048: >= 2x"
    ratios, parts = [], []
    for b in (1, 64, 2048):
        kw = {"size": "4096x4096", "batch": b, "dtype": "float32", "mode": "fwdbwd"}
        ours = [x for x in find(structure="monarch", **kw) if x["hparams"].get("nblocks") == 64]
        fly = [x for x in find(structure="fly.monarch", **kw) if x["hparams"].get("nblocks") == 64]
        if not ours or not fly:
            parts.append(f"batch {b}: not measured")
            continue
        m, f = ours[0], fly[0]
        ratios.append(m["speedup"] / f["speedup"])
        parts.append(f"batch {b}: {ratios[-1]:.2f}x ({m['time_ms']:.3f} vs fly {f['time_ms']:.3f} ms)")
    if not ratios:
        return {"target": text, "met": None, "measured": "not measured in this run"}
    met = False if min(ratios) < 2.0 else (True if len(ratios) == 3 else None)  # None: a batch is missing
    return {"target": text, "met": met, "measured": "; ".join(parts)}


def _target(text: str, rows: list[dict], ok: Callable[[dict], bool], fmt: Callable[[dict], str]) -> dict:
    if not rows:
        return {"target": text, "met": None, "measured": "not measured in this run"}
    x = rows[0]
    return {"target": text, "met": bool(ok(x)), "measured": fmt(x), "load1": x.get("load1")}
