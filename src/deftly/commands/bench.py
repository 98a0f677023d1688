"""``deftly bench``: time every structure against ``nn.Linear`` (see :mod:`deftly.bench`).

Quick default (n = 4096, fp32, batch 1/64/2048, forward and forward+backward, about two minutes on two
cores); ``--full`` for the whole grid. Writes ``<out>.json``, ``<out>.txt`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse

HELP = "benchmark every structure against nn.Linear: time, GFLOP/s, speed-up vs ideal, peak memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="the whole grid: sizes 1024, 4096 and 1024x4096, "
                        "bf16 when the CPU runs it faster than fp32, peers, forced backends (~15-30 min)")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="INxOUT", help="override the sizes")
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


def run(args: argparse.Namespace) -> int:
    from ..bench import main_args

    return main_args(args)
