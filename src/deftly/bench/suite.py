"""The suite: every case timed against nn.Linear in one process, one row each."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear
from .config import KERNEL_STRUCTURES, BenchConfig, build
from .measure import _load1, bf16_check, machine_info, measure_pair, peak_memory
from .peers import PEERS, Peer, _quiet_warnings, peers_available

#: rows -> target verdicts (the issues' thresholds live in benchmarks/targets.py)
Targets = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
#: what a row times: a deftly structure or a peer implementation
Layer: TypeAlias = "StructuredLinear | Peer"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _callables(layer: nn.Module, x: Tensor, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return layer(x)
        return fwd
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    inputs = [xg, *params]
    with torch.no_grad():
        y0 = layer(xg)
    gy = torch.randn(y0.shape, dtype=y0.dtype, generator=torch.Generator().manual_seed(1))
    del y0

    def fwdbwd():
        y = layer(xg)
        return torch.autograd.grad(y, inputs, gy, allow_unused=True)
    return fwdbwd


def _chosen_backend(layer: Layer, batch: int, dtype: torch.dtype, mode: str) -> str:
    """The dispatcher's choice for this row (``*``: its untuned default), or ``-`` for peers."""
    from ..kernels import dispatch as dsp

    forced = layer.__dict__.get("kernel_backend")
    if forced:
        return forced
    if not isinstance(layer, StructuredLinear):  # a peer: no dispatcher
        return "-"
    wd = getattr(layer, "weight_dtype", dtype)
    if wd.is_complex and not dtype.is_complex:  # real inputs are cast to the layer's complex dtype
        dtype = wd
    hit = dsp.lookup(layer, batch, dtype, "infer" if mode == "fwd" else "train")
    return hit or dsp._DEFAULT.get(layer.name, "native") + "*"


def _cases(cfg: BenchConfig) -> list[tuple[str, str, dict]]:
    """``(label, kind, extra)``: kind ``structure`` / ``peer``; extra: constructor kwargs or backend."""
    from ..core.registry import structures

    names = cfg.structures or structures()
    out: list[tuple[str, str, dict]] = []
    for name in names:
        if name == "dense":
            continue
        out.append((name, "structure", {}))
        if cfg.backends and name in KERNEL_STRUCTURES:
            from ..kernels import backends

            # only what runs on the CPU (triton: benchmarks/gpu_triton.py; forced, it would fall back)
            for b in backends(name, torch.empty(1, 1)):
                if b != "dense":
                    out.append((f"{name}@{b}", "structure", {"backend": b}))
        if cfg.fft and name == "butterfly":
            out.append(("butterfly[fft]", "structure", {"init": "fft"}))
    if cfg.peers:
        avail = peers_available()
        for peer in PEERS:
            if not avail.get(peer.split(".")[0], "skipped").startswith("skipped"):
                out.append((peer, "peer", {}))
    return out


def _make(label: str, kind: str, extra: dict, in_f: int, out_f: int, dtype: torch.dtype) -> Layer:
    if kind == "peer":
        return PEERS[label](in_f, out_f, dtype)
    name = label.split("@")[0].split("[")[0]
    kw = {k: v for k, v in extra.items() if k != "backend"}
    layer = build(name, in_f, out_f, dtype, **kw)
    if "backend" in extra:
        layer.kernel_backend = extra["backend"]
    return layer


def count_rows(cfg: BenchConfig, cases: list[tuple[str, str, dict]] | None = None,
               dtypes: list[str] | None = None) -> int:
    """Rows the grid will measure (at most: a case that cannot be built at a size is skipped)."""
    cases = _cases(cfg) if cases is None else cases
    n = 0
    for in_f, out_f in cfg.sizes:
        for dname in cfg.dtypes if dtypes is None else dtypes:
            n += sum(1 for label, _, _ in cases
                     if not (label == "butterfly[fft]" and (in_f != out_f or dname == "bfloat16")))
    return n * len(cfg.batches) * len(cfg.modes)


#: the per-row formula of :func:`estimate_seconds` replayed with the recorded nn.Linear times of
#: benchmarks/results/bench.quick.json (60 rows: 147 s) and bench.json (840 rows: 740 s) under-counts the
#: recorded run times (337 s and 1,627 s) by 2.3x and 2.2x: timer, profiler and layer-building overheads
OVERHEAD = 2.2


def matmul_rate(seconds: float = 0.1) -> float:
    """FLOP/s of a float32 matmul here (the best of a few calls of 512 x 1024 @ 1024 x 1024)."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    a @ b
    best, t_end = math.inf, time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return 2 * 512 * 1024 * 1024 / max(best, 1e-9)


def estimate_seconds(cfg: BenchConfig, rate: float | None = None,
                     cases: list[tuple[str, str, dict]] | None = None) -> float:
    """A rough estimate of the run time: ``OVERHEAD`` x the sum over rows of the warm-up calls and the
    interleaved samples of the structured layer and nn.Linear (at least ``min_run_time``, at least
    ``min_samples`` of each), each call costed as nn.Linear's FLOPs at ``rate`` (:func:`matmul_rate`;
    structured calls are counted as dense ones), plus the peak-memory probe of forward+backward rows and
    20 ms per row."""
    rate = matmul_rate() if rate is None else rate
    cases = _cases(cfg) if cases is None else cases
    total = 0.0
    for in_f, out_f in cfg.sizes:
        for dname in cfg.dtypes:
            n_cases = sum(1 for label, _, _ in cases
                          if not (label == "butterfly[fft]" and (in_f != out_f or dname == "bfloat16")))
            for batch in cfg.batches:
                for mode in cfg.modes:
                    call = 2 * in_f * out_f * batch * (3 if mode == "fwdbwd" else 1) / rate + 5e-5
                    pair = 2 * call
                    row = 2 * pair + max(cfg.min_run_time, cfg.min_samples * pair) + 0.02
                    if cfg.memory and mode == "fwdbwd":
                        row += call + 0.05
                    total += n_cases * row
    return OVERHEAD * total


def run(cfg: BenchConfig, log: Callable[[str], None] = print, targets: Targets | None = None,
        on_row: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Run the grid; returns ``{"meta": ..., "rows": [...], "targets": [...]}``. ``on_row(meta, rows)``
    is called after each measured row (the rows so far), e.g. to save partial results."""
    from .. import kernels as K

    torch.manual_seed(cfg.seed)
    meta = {**machine_info(), "config": {**asdict(cfg), "sizes": [f"{i}x{o}" for i, o in cfg.sizes]},
            "load_start": _load1(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv), "peers": peers_available() if cfg.peers else {}}
    dtypes = list(cfg.dtypes)
    if "bfloat16" in dtypes:
        chk = bf16_check()
        meta["bf16_check"] = chk
        if not chk["bf16_fast"]:
            dtypes.remove("bfloat16")
            log(f"bf16 skipped: matmul at {chk['bfloat16_gflops']:.0f} GFLOP/s vs fp32 "
                f"{chk['float32_gflops']:.0f} GFLOP/s")
    meta["dtypes_run"] = dtypes
    cases = _cases(cfg)
    meta["hparams"] = {}
    rows: list[dict[str, Any]] = []
    total_rows = count_rows(cfg, cases, dtypes)
    t_start = time.perf_counter()
    for in_f, out_f in cfg.sizes:
        for dname in dtypes:
            dt = _dtype(dname)
            layers: dict[str, Layer] = {}
            for label, kind, extra in cases:
                if label == "butterfly[fft]" and in_f != out_f:
                    continue
                if dname == "bfloat16" and label == "butterfly[fft]":
                    continue  # no complex bf16
                try:
                    with _quiet_warnings():
                        layers[label] = _make(label, kind, extra, in_f, out_f, dt)
                except Exception as err:  # noqa: BLE001 - a peer/structure that cannot be built here
                    log(f"  skip {label} {in_f}x{out_f} {dname}: {type(err).__name__}: {err}")
                    continue
                hp = layers[label].hparams() if hasattr(layers[label], "hparams") else {}
                meta["hparams"][f"{label}@{in_f}x{out_f}"] = {k: _jsonable(v) for k, v in hp.items()}
            torch.manual_seed(cfg.seed)
            dense = nn.Linear(in_f, out_f, dtype=dt)
            for batch in cfg.batches:
                x = torch.randn(batch, in_f, dtype=dt)
                for mode in cfg.modes:
                    K.clear_workspace()
                    dfn = _callables(dense, x, mode)
                    dmem = peak_memory(dfn) if (cfg.memory and mode == "fwdbwd") else None
                    dflops = 2 * in_f * out_f * batch * (3 if mode == "fwdbwd" else 1)
                    log(f"{in_f}x{out_f} {dname} batch {batch} {mode} (load {_load1():.2f}; {len(rows)}/"
                        f"{total_rows} rows in {time.perf_counter() - t_start:.0f} s)")
                    for label, layer in layers.items():
                        try:
                            fn = _callables(layer, x, mode)
                            m, dm = measure_pair(fn, dfn, cfg.min_run_time, cfg.min_samples)
                            mem = None
                            if cfg.memory and mode == "fwdbwd":
                                K.clear_workspace()
                                mem = peak_memory(fn)
                        except Exception as err:  # noqa: BLE001
                            log(f"  {label}: failed: {type(err).__name__}: {err}")
                            continue
                        fwd_flops = int(layer.flops(batch))
                        flops = fwd_flops * (3 if mode == "fwdbwd" else 1)
                        row = _row(label, layer, in_f, out_f, batch, dname, mode, m, dm, flops, dflops, mem,
                                   dmem)
                        row["backend"] = _chosen_backend(layer, batch, dt, mode)
                        rows.append(row)
                        if on_row is not None:
                            on_row(meta, rows)
                        log(f"  {label:18s} {row['time_ms']:10.3f} ms vs {row['dense_time_ms']:10.3f} ms "
                            f"{row['speedup']:7.2f}x "
                            f"(ideal {row['ideal']:.1f}x, {100 * row['fraction']:.0f}%)  [{row['backend']}]")
                    K.clear_workspace()
            del layers
            K.clear_cache()
    meta["load_end"] = _load1()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["workspace"] = K.workspace_stats()
    return {"meta": meta, "rows": rows, "targets": targets(rows) if targets else []}


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _row(label, layer, in_f, out_f, batch, dname, mode, m, dm, flops, dflops, mem, dmem) -> dict[str, Any]:
    t, td = m["median"], dm["median"]
    ideal = dflops / flops if flops else float("inf")
    speedup = td / t
    hp = layer.hparams() if hasattr(layer, "hparams") else {}
    return {
        "structure": label, "hparams": {k: _jsonable(v) for k, v in hp.items()},
        "in": in_f, "out": out_f, "size": f"{in_f}x{out_f}", "batch": batch, "dtype": dname, "mode": mode,
        "time_ms": t * 1e3, "time_min_ms": m["min"] * 1e3, "samples": m["samples"],
        "dense_time_ms": td * 1e3, "flops": flops, "dense_flops": dflops,
        "gflops": flops / t / 1e9, "dense_gflops": dflops / td / 1e9,
        "speedup": speedup, "ideal": ideal, "fraction": speedup / ideal if ideal else float("nan"),
        # the same from the fastest block of each: least disturbed by other processes on a shared machine
        "speedup_min": dm["min"] / m["min"], "dense_time_min_ms": dm["min"] * 1e3,
        "peak_mem_bytes": mem, "dense_peak_mem_bytes": dmem,
        "params": sum(p.numel() for p in layer.parameters() if p.requires_grad),
        "load1": _load1(),
    }
