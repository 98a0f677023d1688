"""Timing (interleaved with the baseline), peak memory, allocator and machine facts."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def measure(fn: Callable[[], Any], min_run_time: float = 0.3, min_samples: int = 3) -> dict[str, Any]:
    """Median seconds per call of ``fn`` after two warm-up calls, with ``torch.utils.benchmark.Timer``
    (``num_threads=torch.get_num_threads()``; the Timer defaults to one thread).

    Samples are blocks of ``number`` calls (``number`` chosen for about ten blocks in ``min_run_time``;
    1 for long calls); at least ``min_samples`` blocks and ``min_run_time`` seconds in all.
    """
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call work (dispatch tuning, caches, buffer pool)
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    number = max(1, int(min_run_time / (10 * est)))
    times: list[float] = []
    spent = 0.0
    while len(times) < min_samples or spent < min_run_time:
        t = timer.timeit(number).median  # seconds per call in this block
        times.append(t)
        spent += t * number
    return {"median": statistics.median(times), "min": min(times), "samples": len(times), "number": number}


def measure_pair(fa: Callable[[], Any], fb: Callable[[], Any], min_run_time: float = 0.3,
                 min_samples: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`measure` for two callables at once, their blocks interleaved (a, b, a, b, ...), so that a
    change of load from other processes hits both alike; the speed-up ``b / a`` is then a ratio of
    medians taken over the same time window."""
    from torch.utils.benchmark import Timer

    est = []
    for f in (fa, fb):
        f()  # warm-up: first-call work (dispatch tuning, caches, buffer pool)
        t0 = time.perf_counter()
        f()
        est.append(max(time.perf_counter() - t0, 1e-7))
    timers = [Timer(stmt="fn()", globals={"fn": f}, num_threads=torch.get_num_threads()) for f in (fa, fb)]
    numbers = [max(1, int(min_run_time / (10 * e))) for e in est]
    times: list[list[float]] = [[], []]
    spent = 0.0
    while min(len(t) for t in times) < min_samples or spent < min_run_time:
        for i in (0, 1):
            t = timers[i].timeit(numbers[i]).median
            times[i].append(t)
            spent += t * numbers[i]
    return tuple({"median": statistics.median(t), "min": min(t), "samples": len(t), "number": n}
                 for t, n in zip(times, numbers))  # type: ignore[return-value]


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes live in torch's CPU allocator during one call of ``fn`` (above the level at entry),
    from ``torch.profiler``'s allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with _silence_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


@contextlib.contextmanager
def _silence_fd(fd: int):
    """Kineto prints start/stop lines on the C-level stderr; hide them."""
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):  # pragma: no cover
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def allocator_name() -> str:
    """Which malloc serves torch's CPU tensors in this process, and whether THP allocation is on."""
    name = "glibc"
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
        if "tcmalloc" in maps:
            name = "tcmalloc"
        elif "jemalloc" in maps:
            name = "jemalloc"
    except OSError:  # pragma: no cover
        name = "unknown"
    if name == "glibc" and "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        name = "glibc-nommap"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        name += "+THP"
    return name


def find_tcmalloc() -> str | None:
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        for f in ("libtcmalloc.so.4", "libtcmalloc_minimal.so.4", "libtcmalloc.so"):
            p = os.path.join(d, f)
            if os.path.exists(p):
                return p
    return None


def bf16_check(n: int = 2048) -> dict[str, float | bool]:
    """GFLOP/s of an ``n^3`` matmul in fp32 and bf16; bf16 counts as fast when it is >= 1.25x fp32."""
    out: dict[str, float | bool] = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        m = measure(functools.partial(torch.matmul, a, b), min_run_time=0.3)
        out[str(dt).replace("torch.", "") + "_gflops"] = 2 * n ** 3 / m["median"] / 1e9
    out["bf16_fast"] = out["bfloat16_gflops"] >= 1.25 * out["float32_gflops"]
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(),
            "capability": torch.backends.cpu.get_cpu_capability(), "allocator": allocator_name(),
            "blas": "MKL" if torch.backends.mkl.is_available() else "other"}


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")
