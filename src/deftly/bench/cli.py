"""``deftly bench`` / ``python -m deftly.bench``: arguments and the run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import GLIBC_NOMMAP, BenchConfig, full_config, quick_config
from .measure import _load1, find_tcmalloc, machine_info
from .output import report, write
from .suite import Targets, run

HELP = "benchmark every structure against nn.Linear: time, GFLOP/s, speed-up vs ideal, peak memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="the whole grid: sizes 1024, 4096 and 1024x4096, "
                        "bf16 when the CPU runs it faster than fp32, peers, forced backends (~15-30 min)")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="INxOUT", help="override the sizes")
    parser.add_argument("--tune", action="store_true", help="measure the latency-budget candidates (every "
                        "structure at a ladder of parameter budgets vs nn.Linear) for --sizes at --rows rows per "
                        "call and write them to the per-machine cache that StructureConfig(budget_kind="
                        "'latency') reads")
    parser.add_argument("--rows", type=int, default=4096, help="with --tune: rows per call (batch x tokens)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="override the batch sizes")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=None, choices=["fwd", "fwdbwd"])
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="structures to run (default: every registered one)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                        help="include cola-ml / PEFT peers when installed (default: only with --full)")
    parser.add_argument("--backends", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each forced backend of monarch/blockdiag/butterfly (default: --full)")
    parser.add_argument("--no-fft", action="store_true", help="skip the exact-FFT butterfly row")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="output prefix (default: benchmarks/results/bench with "
                        "--full, benchmarks/results/bench.quick otherwise)")
    parser.add_argument("--no-png", action="store_true", help="skip the plot")
    parser.add_argument("--allocators", nargs="+", default=None, choices=["glibc", "glibc-nommap", "thp", "tcmalloc"],
                        help="run the suite once per allocator, each in its own subprocess (layer and "
                             "nn.Linear always share one), and merge the tables: glibc (default malloc), "
                             "glibc-nommap (GLIBC_TUNABLES: no mmap, no trim), thp (THP_MEM_ALLOC_ENABLE=1), "
                             "tcmalloc (LD_PRELOAD libtcmalloc, apt libgoogle-perftools4)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-min load average to fall below 0.5")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(THREADS)")


def config_from_args(args) -> BenchConfig:
    cfg = full_config() if args.full else quick_config()
    if args.sizes:
        cfg.sizes = [_parse_size(s) for s in args.sizes]
    if args.batches:
        cfg.batches = list(args.batches)
    if args.dtypes:
        cfg.dtypes = list(args.dtypes)
    if args.modes:
        cfg.modes = list(args.modes)
    if args.structures:
        from ..core.registry import get

        for s in args.structures:
            get(s)
        cfg.structures = list(args.structures)
    if args.peers is not None:
        cfg.peers = args.peers
    if args.backends is not None:
        cfg.backends = args.backends
    if args.no_fft:
        cfg.fft = False
    if args.no_memory:
        cfg.memory = False
    if args.min_run_time is not None:
        cfg.min_run_time = args.min_run_time
    return cfg


def _parse_size(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        size = int(a), int(b)
    except ValueError:
        raise ValueError(f"size {text!r} is not of the form INxOUT, e.g. 1024x4096") from None
    if min(size) < 1:
        raise ValueError(f"size {text!r} must have positive dimensions")
    return size


def wait_quiet(seconds: float, threshold: float = 0.5, log: Callable[[str], None] = print) -> float:
    t0 = time.time()
    load = _load1()
    while load >= threshold and time.time() - t0 < seconds:
        time.sleep(5)
        load = _load1()
    if load >= threshold:
        log(f"machine not quiet after {seconds:.0f} s: 1-min load {load:.2f} (measuring anyway)")
    return load


def _check_args(args) -> None:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1 (or leave it unset for torch's default)")
    if args.batches and min(args.batches) < 1:
        raise ValueError(f"--batches {' '.join(map(str, args.batches))}: every batch size must be >= 1")
    if args.min_run_time is not None and not 0 < args.min_run_time < float("inf"):
        raise ValueError(f"--min-run-time {args.min_run_time}: must be a positive number of seconds, e.g. 0.3")
    if args.wait_quiet < 0:
        raise ValueError(f"--wait-quiet {args.wait_quiet}: must be >= 0 seconds")


def partial_path(prefix: str) -> str:
    """Where the rows measured so far are kept while the suite runs (removed once the results are written)."""
    return prefix + ".partial.json"


def _save_partial(path: str, meta: dict[str, Any], rows: list[dict[str, Any]], total: int) -> None:
    from ..core.files import atomic_write_bytes

    payload = {"partial": True, "rows_planned": total, "meta": meta, "rows": rows}
    atomic_write_bytes(path, (json.dumps(payload, indent=1, default=str) + "\n").encode())


def _tune(args: argparse.Namespace) -> int:
    """``deftly bench --tune``: fill the latency cache for ``--sizes`` and print each shape's candidates."""
    from ..surgery import latency

    if not args.sizes:
        raise ValueError("deftly bench --tune needs --sizes INxOUT ... (the layer shapes of your model, e.g. "
                         "--sizes 384x384 384x1536 1536x384)")
    opts = latency.Latency(rows=args.rows)
    shapes = [_parse_size(s) for s in args.sizes]
    found = latency.tune(shapes, args.structures, opts, log=print)
    for (i, o), cands in found.items():
        print(f"\n{i}x{o}, {opts.rows} rows ({opts.mode}, {str(opts.dtype).replace('torch.', '')}):")
        for c in sorted(cands, key=lambda c: c.time_fraction):
            print(f"  {c.structure:10s} {c.hparams!s:60s} params {c.params:>10,}  time {c.time_fraction:5.2f}x "
                  f"dense  speed-up {c.speedup:5.2f}x")
    print(f"\nwrote {latency.cache_path()}")
    return 0


def main_args(args, targets: Targets | None = None) -> int:
    """Run ``deftly bench``: prints a time estimate first; every measured row is saved at once (atomically)
    to ``<out>.partial.json``, so an interrupted run keeps what it measured (``args._interrupt_note`` says
    where); the full results replace it at the end."""
    from ..train.results import plots_skipped_reason
    from .suite import _cases, count_rows, estimate_seconds

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "tune", False):
        return _tune(args)
    cfg = config_from_args(args)
    prefix = args.out or os.path.join("benchmarks", "results", "bench" if args.full else "bench.quick")
    png = not args.no_png
    if png and plots_skipped_reason():
        print(f"plot skipped ({prefix}.png not written): {plots_skipped_reason()}")
        png = False
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    if args.allocators:
        result = _run_allocators(args, prefix, targets)
    else:
        cases = _cases(cfg)
        total = count_rows(cfg, cases)
        est = estimate_seconds(cfg, cases=cases)
        partial = partial_path(prefix)
        os.makedirs(os.path.dirname(partial) or ".", exist_ok=True)
        print(f"deftly bench: {total} rows ({len(cfg.sizes)} size(s) x {len(cfg.dtypes)} dtype(s) x "
              f"{len(cfg.batches)} batch(es) x {len(cfg.modes)} mode(s) x the structures); rough estimate "
              f"{_duration(est)} on this machine (more when it is busy). Rows are saved to {partial} as they "
              f"are measured.", flush=True)
        if os.path.exists(partial):
            os.remove(partial)  # an older run's rows are not this run's
        args._interrupt_note = f"nothing measured yet ({partial} not written)"

        def on_row(meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
            _save_partial(partial, meta, rows, total)
            args._interrupt_note = (f"the {len(rows)} of {total} rows measured are kept in {partial} (the JSON "
                                    f"of the final results, with \"partial\": true)")

        result = run(cfg, targets=targets, on_row=on_row)
    print()
    print(report(result))
    paths = write(result, prefix, png=png)
    if not args.allocators and os.path.exists(partial_path(prefix)):
        os.remove(partial_path(prefix))
    print("\nwrote " + ", ".join(paths))
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def _run_allocators(args, prefix: str, targets: Targets | None = None) -> dict[str, Any]:
    """One subprocess per allocator (same arguments), rows tagged with ``allocator``; meta of the first."""
    merged: dict[str, Any] = {"meta": None, "rows": [], "targets": [], "by_allocator": {}}
    argv = [a for a in sys.argv[1:] if a not in ("bench",)]
    argv = _strip_option(argv, "--allocators")
    argv = _strip_option(argv, "--out")
    argv = _strip_option(argv, "--wait-quiet")
    for alloc in args.allocators:
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if alloc == "thp":
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        elif alloc == "glibc-nommap":
            env["GLIBC_TUNABLES"] = GLIBC_NOMMAP
        elif alloc == "tcmalloc":
            lib = find_tcmalloc()
            if lib is None:
                print("tcmalloc not found (apt-get install libgoogle-perftools4); skipped")
                continue
            env["LD_PRELOAD"] = lib
        sub = f"{prefix}.{alloc}"
        cmd = [sys.executable, "-m", "deftly.bench", *argv, "--out", sub, "--no-png"]
        print(f"== allocator {alloc}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        with open(sub + ".json") as f:
            res = json.load(f)
        for r in res["rows"]:
            r["allocator"] = res["meta"]["allocator"]
        res["targets"] = targets(res["rows"]) if targets else []
        merged["rows"] += res["rows"]
        merged["by_allocator"][res["meta"]["allocator"]] = {"targets": res["targets"], "meta": res["meta"]}
        if merged["meta"] is None:
            merged["meta"] = res["meta"]
            merged["targets"] = res["targets"]
    merged["meta"] = dict(merged["meta"] or machine_info())
    merged["meta"]["allocator"] = " / ".join(merged["by_allocator"]) + " (one subprocess each)"
    return merged


def _strip_option(argv: list[str], opt: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a == opt or a.startswith(opt + "="):
            skip = a == opt
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None, targets: Targets | None = None) -> int:
    """``deftly bench`` / ``python benchmarks/bench.py`` (with the issues' targets) / ``python -m deftly.bench``."""


    parser = argparse.ArgumentParser(prog="deftly bench", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_args(args, targets)
    except KeyboardInterrupt:
        note = getattr(args, "_interrupt_note", None)
        print("deftly bench: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as err:
        print(f"deftly bench: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
