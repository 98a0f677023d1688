"""deftly's benchmark suite: every registered structure against ``nn.Linear``, measured in one process.

For each structure (walked from the registry), size ``in x out``, batch, dtype and mode (``fwd``: forward
under ``torch.no_grad()``; ``fwdbwd``: forward + backward to the input and every parameter through
``torch.autograd.grad``) the suite reports

* the median time per call after warm-up (``torch.utils.benchmark.Timer`` with
  ``num_threads=torch.get_num_threads()``; the warm-up also runs the kernel dispatcher's one-off tuning),
* FLOPs from ``layer.flops`` (forward; forward+backward counts 3x forward) and achieved GFLOP/s,
* the speed-up over ``nn.Linear`` of the same size, dtype and mode, timed in the same process and
  interleaved with the structure (blocks of calls alternate), so both see the same load,
* the ideal speed-up ``dense FLOPs / structured FLOPs`` and the fraction of it achieved (which equals
  the ratio of the two GFLOP/s figures),
* the peak memory of one forward+backward: the high-water mark of bytes live in torch's CPU allocator
  during the call, from the ``[memory]`` allocation/free events of ``torch.profiler`` (the kernels'
  workspace pool is emptied first, so buffers it keeps count as allocations),
* the backend the dispatcher chose (:mod:`deftly.kernels.dispatch`).

Peers from PyPI, when importable: ``cola-ml`` Kronecker / block-diagonal / low-rank operators and PEFT's
LoRA and BOFT layers. The default run is a quick subset (n = 4096, fp32); ``--full`` runs the whole grid
(``n`` in {1024, 4096} and 1024x4096, batch {1, 64, 2048}, fp32 and bf16 when the CPU runs bf16 matmul
faster than fp32, forced backends side by side). Results go to ``<out>.json``, ``<out>.txt`` (the table)
and ``<out>.png`` (speed-up vs batch per structure, with each structure's ideal as a dashed line).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BenchConfig",
    "allocator_name",
    "bench_hparams",
    "bf16_check",
    "evaluate_targets",
    "format_table",
    "full_config",
    "main",
    "measure",
    "measure_pair",
    "peak_memory",
    "plot",
    "quick_config",
    "report",
    "run",
    "write",
]

SIZES_FULL = [(1024, 1024), (4096, 4096), (1024, 4096)]
#: glibc without mmap for large blocks and without trimming: freed 32 MB buffers are reused from the heap
#: instead of being unmapped and page-faulted in again (glibc's mmap threshold cannot exceed 32 MiB)
GLIBC_NOMMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
BATCHES = [1, 64, 2048]
KERNEL_STRUCTURES = ("monarch", "blockdiag", "butterfly")


@dataclass
class BenchConfig:
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 4096)])
    batches: list[int] = field(default_factory=lambda: list(BATCHES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])
    structures: list[str] | None = None  # None: every registered structure
    fft: bool = True  # the exact-FFT butterfly as an extra row (square sizes)
    peers: bool = False
    backends: bool = False  # also time each forced backend of the kernel structures
    min_run_time: float = 0.3
    min_samples: int = 3
    memory: bool = True
    seed: int = 0


def quick_config() -> BenchConfig:
    """About two minutes on 2 cores: n = 4096, fp32, every structure, plus Monarch/blockdiag native."""
    return BenchConfig(backends=False)


def full_config() -> BenchConfig:
    return BenchConfig(sizes=list(SIZES_FULL), dtypes=["float32", "bfloat16"], peers=True, backends=True,
                       min_run_time=1.0)


# ------------------------------------------------------------------------------------------ layers
def bench_hparams(name: str, in_f: int, out_f: int) -> dict[str, Any]:
    """Hyperparameters used by the suite: Monarch and block-diagonal with ``sqrt(min(in, out))`` blocks
    (64 at n = 4096, 32 at n = 1024); every other structure with its constructor defaults."""
    k = math.isqrt(min(in_f, out_f))
    if name == "monarch":
        return {"nblocks": math.isqrt(in_f)}
    if name == "blockdiag":
        return {"nblocks": k}
    return {}


def build(name: str, in_f: int, out_f: int, dtype: torch.dtype, **extra: Any) -> nn.Module:
    import deftly

    hp = {**bench_hparams(name, in_f, out_f), **extra}
    try:
        return deftly.make(name, in_f, out_f, dtype=dtype, **hp)
    except (ValueError, TypeError):
        ex = deftly.get(name).examples(in_f, out_f)[0]
        return deftly.make(name, in_f, out_f, dtype=dtype, **{**ex, **extra})


# ------------------------------------------------------------------------------------------ peers
class _ColaModule(nn.Module):
    def __init__(self, kind: str, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        super().__init__()
        import cola

        self.kind, self.in_features, self.out_features = kind, in_f, out_f
        self._cola = cola
        g = torch.Generator().manual_seed(0)
        if kind == "kronecker":
            a_in, a_out = math.isqrt(in_f), math.isqrt(out_f)
            if a_in * a_in != in_f or a_out * a_out != out_f:
                raise ValueError("cola kronecker needs square-number sizes")
            self.A = nn.Parameter(torch.randn(a_out, a_in, generator=g, dtype=dtype) / math.sqrt(a_in))
            self.B = nn.Parameter(torch.randn(a_out, a_in, generator=g, dtype=dtype) / math.sqrt(a_in))
            self._flops = 2 * (a_out * a_in * a_in + a_out * a_out * a_in)
        elif kind == "blockdiag":
            k = math.isqrt(min(in_f, out_f))
            if in_f % k or out_f % k:
                raise ValueError("cola blockdiag needs divisible sizes")
            self.W = nn.ParameterList(nn.Parameter(torch.randn(out_f // k, in_f // k, generator=g, dtype=dtype))
                                      for _ in range(k))
            self._flops = 2 * in_f * out_f // k
            self.nblocks = k
        elif kind == "lowrank":
            r = 16
            self.U = nn.Parameter(torch.randn(out_f, r, generator=g, dtype=dtype) / 4)
            self.V = nn.Parameter(torch.randn(r, in_f, generator=g, dtype=dtype) / math.sqrt(in_f))
            self._flops = 2 * r * (in_f + out_f)
        else:  # pragma: no cover
            raise ValueError(kind)

    def op(self):
        ops = self._cola.ops
        if self.kind == "kronecker":
            return ops.Kronecker(ops.Dense(self.A), ops.Dense(self.B))
        if self.kind == "blockdiag":
            return ops.BlockDiag(*[ops.Dense(w) for w in self.W])
        return ops.Dense(self.U) @ ops.Dense(self.V)

    def forward(self, x: Tensor) -> Tensor:
        return (self.op() @ x.T).T

    def flops(self, batch: int = 1) -> int:
        return batch * self._flops

    def hparams(self) -> dict:
        return {"kronecker": {}, "blockdiag": {"nblocks": getattr(self, "nblocks", 0)},
                "lowrank": {"rank": 16}}[self.kind]


class _PeftModule(nn.Module):
    def __init__(self, kind: str, in_f: int, out_f: int, dtype: torch.dtype) -> None:
        super().__init__()
        import peft

        class _M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(in_f, out_f, dtype=dtype)

            def forward(self, x: Tensor) -> Tensor:
                return self.lin(x)

        self.kind, self.in_features, self.out_features = kind, in_f, out_f
        with _quiet_warnings():
            if kind == "lora":
                cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["lin"])
                self._hp = {"r": 16}
                self._flops = 2 * in_f * out_f + 2 * 16 * (in_f + out_f)
            else:
                cfg = peft.BOFTConfig(boft_block_size=32, boft_n_butterfly_factor=1, target_modules=["lin"])
                self._hp = {"boft_block_size": 32, "boft_n_butterfly_factor": 1}
                # frozen dense weight rotated by the block-orthogonal matrix, then the dense multiply
                self._flops = 2 * in_f * out_f
            self.model = peft.get_peft_model(_M(), cfg)
        self.model.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def flops(self, batch: int = 1) -> int:
        return batch * self._flops

    def hparams(self) -> dict:
        return dict(self._hp)


PEERS: dict[str, Callable[[int, int, torch.dtype], nn.Module]] = {
    "cola.kronecker": lambda i, o, d: _ColaModule("kronecker", i, o, d),
    "cola.blockdiag": lambda i, o, d: _ColaModule("blockdiag", i, o, d),
    "cola.lowrank": lambda i, o, d: _ColaModule("lowrank", i, o, d),
    "peft.lora": lambda i, o, d: _PeftModule("lora", i, o, d),
    "peft.boft": lambda i, o, d: _PeftModule("boft", i, o, d),
}


def peers_available() -> dict[str, str]:
    """``{peer family: version or reason it is skipped}``."""
    out = {}
    for mod in ("cola", "peft"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception as err:  # noqa: BLE001 - any import failure means "not available"
            out[mod] = f"skipped: {type(err).__name__}: {err}"
    return out


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------ measuring
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
        m = measure(lambda a=a, b=b: a @ b, min_run_time=0.3)
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


# ------------------------------------------------------------------------------------------ cases
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


def _chosen_backend(layer: nn.Module, batch: int, dtype: torch.dtype, mode: str) -> str:
    """The dispatcher's choice for this row (``*``: its untuned default), or ``-`` for peers."""
    import deftly.kernels.dispatch as dsp

    forced = layer.__dict__.get("kernel_backend")
    if forced:
        return forced
    if not hasattr(layer, "hparams") or not hasattr(layer, "name"):
        return "-"
    wd = getattr(layer, "weight_dtype", dtype)
    if wd.is_complex and not dtype.is_complex:  # real inputs are cast to the layer's complex dtype
        dtype = wd
    hit = dsp.lookup(layer, batch, dtype, "infer" if mode == "fwd" else "train")
    return hit or dsp._DEFAULT.get(layer.name, "native") + "*"


def _cases(cfg: BenchConfig) -> list[tuple[str, str, dict]]:
    """``(label, kind, extra)``: kind ``structure`` / ``peer``; extra: constructor kwargs or backend."""
    import deftly

    names = cfg.structures or deftly.structures()
    out: list[tuple[str, str, dict]] = []
    for name in names:
        if name == "dense":
            continue
        out.append((name, "structure", {}))
        if cfg.backends and name in KERNEL_STRUCTURES:
            import deftly.kernels as K

            # only what runs on the CPU (triton: benchmarks/gpu_triton.py; forced, it would fall back)
            for b in K.backends(name, torch.empty(1, 1)):
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


def _make(label: str, kind: str, extra: dict, in_f: int, out_f: int, dtype: torch.dtype) -> nn.Module:
    if kind == "peer":
        return PEERS[label](in_f, out_f, dtype)
    name = label.split("@")[0].split("[")[0]
    kw = {k: v for k, v in extra.items() if k != "backend"}
    layer = build(name, in_f, out_f, dtype, **kw)
    if "backend" in extra:
        layer.kernel_backend = extra["backend"]
    return layer


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid; returns ``{"meta": ..., "rows": [...], "targets": [...]}``."""
    import deftly.kernels as K

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
    for in_f, out_f in cfg.sizes:
        for dname in dtypes:
            dt = _dtype(dname)
            layers: dict[str, nn.Module] = {}
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
                    log(f"{in_f}x{out_f} {dname} batch {batch} {mode} (load {_load1():.2f})")
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
                        log(f"  {label:18s} {row['time_ms']:10.3f} ms vs {row['dense_time_ms']:10.3f} ms "
                            f"{row['speedup']:7.2f}x "
                            f"(ideal {row['ideal']:.1f}x, {100 * row['fraction']:.0f}%)  [{row['backend']}]")
                    K.clear_workspace()
            del layers
            K.clear_cache()
    meta["load_end"] = _load1()
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["workspace"] = K.workspace_stats()
    return {"meta": meta, "rows": rows, "targets": evaluate_targets(rows)}


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


# ------------------------------------------------------------------------------------------ targets
def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four targets of issue #6, from the rows that exist (missing rows are reported as such)."""
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
    return out


def _target(text: str, rows: list[dict], ok: Callable[[dict], bool], fmt: Callable[[dict], str]) -> dict:
    if not rows:
        return {"target": text, "met": None, "measured": "not measured in this run"}
    x = rows[0]
    return {"target": text, "met": bool(ok(x)), "measured": fmt(x), "load1": x.get("load1")}


# ------------------------------------------------------------------------------------------ output
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
    else:
        parts.append("targets:\n" + format_targets(result["targets"]))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------ CLI
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
        import deftly

        for s in args.structures:
            deftly.get(s)
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


def main_args(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    prefix = args.out or os.path.join("benchmarks", "results", "bench" if args.full else "bench.quick")
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    if args.allocators:
        result = _run_allocators(args, prefix)
    else:
        result = run(cfg)
    print()
    print(report(result))
    paths = write(result, prefix, png=not args.no_png)
    print("\nwrote " + ", ".join(paths))
    return 0


def _run_allocators(args, prefix: str) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    """``deftly bench`` / ``python benchmarks/bench.py`` / ``python -m deftly.bench``."""
    import argparse

    from .commands.bench import HELP, add_arguments

    parser = argparse.ArgumentParser(prog="deftly bench", description=HELP)
    add_arguments(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
