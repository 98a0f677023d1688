#!/usr/bin/env python
"""End-to-end speed of structurized models against dense (GitHub issue 14).

Two workloads, each dense vs every structure at each parameter budget, eager and ``torch.compile``:

* **MiniLM inference** — all-MiniLM-L6-v2 (``deftly.data.minilm``, real weights) with the 36 linear
  layers of its encoder (``encoder.*``: query/key/value/attention-output 384x384, intermediate 384x1536,
  output 1536x384) structurized by ``deftly.structurize(..., budget=b, init="random")`` (random structured
  weights: speed does not depend on the values); embeddings, attention, LayerNorms and the pooler stay as
  they are. Input: real Wikipedia paragraphs (``deftly.data.wikipedia``), tokenised and truncated to
  exactly ``--tokens`` (128) tokens each (no padding), ``--batches`` sentences at a time; forward under
  ``torch.inference_mode()``.
* **char-LM training step** — the recipe's GPT (``deftly.train.charlm``: ``CharLMConfig`` defaults, 4
  layers, d=256, 4 heads, ctx 128, batch 16) on real Wikipedia characters; one step = ``zero_grad`` +
  forward + cross-entropy + backward + ``AdamW.step()``. Dense = the recipe's GPT with its projections as
  plain ``nn.Linear``; structured = ``GPT(vocab, structure, fraction)`` exactly as the recipe builds it.

Extra row ``deftly-dense``: the same models with deftly's own ``dense`` structure (a StructuredLinear
holding the full weight, same FLOPs as dense): its gap to dense is deftly's per-call overhead alone.

Timing: for every (workload, batch, structure, budget, eager/compiled), the dense model and the candidate
are called alternately, round by round (which one goes first alternates), in this one process, so a burst
of load from the other processes on the shared machine hits both alike; each sample is a block of calls
lasting at least ``--min-sample`` seconds; we report the median over rounds (and the ratio of minimums).
Warm-up calls first (they include deftly's one-time auto-tuning of its kernel choice per layer shape).
``torch.compile(model)`` (``dynamic=False``; one compile per batch size) is timed the same way against
compiled dense; a structure that fails to compile is recorded with its error.

Profile: ``torch.profiler`` (CPU) over a few calls of every eager model and the compiled ones at the
profile batch: share of the wall time spent in linear layers (forward: ``record_function`` ranges around
every top-level linear module, i.e. structured modules and ``nn.Linear``, including their pads, copies,
bias adds and Python; backward: the autograd nodes whose forward ran inside those ranges, matched by
sequence number), the optimizer step, and the rest; plus the share of matmul-family ops (``mm``,
``addmm``, ``bmm``, ...) by op name, which also works for compiled graphs, and the top ops by self time.

    python benchmarks/e2e.py                 # full run: batches 1/32/128, budgets 0.5/0.25, eager+compile
    python benchmarks/e2e.py --quick         # smoke run (a few minutes)
    python benchmarks/e2e.py --structures lowrank monarch --budgets 0.25 --batches 32 --no-compile

Writes ``e2e.md`` (tables), ``e2e.json`` (every field) and ``e2e.png`` into ``--out``
(default ``benchmarks/results/e2e``). Uses only deftly's public API.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ALL_STRUCTURES = ["lowrank", "monarch", "blockdiag", "lrbd", "btt"]
LINEAR_TAG = "deftly_e2e::linear"
OPT_TAG = "deftly_e2e::optimizer"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "mkl::_mkl_linear", "aten::linear",
            "aten::matmul")
ATTN_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention")


# ------------------------------------------------------------------------------------------- helpers
def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def wait_quiet(max_s: float, threshold: float) -> None:
    """Wait (at most ``max_s`` seconds) until the 1-minute load average drops below ``threshold``."""
    t0 = time.time()
    while max_s > 0 and (loadavg() or 0.0) > threshold and time.time() - t0 < max_s:
        time.sleep(5)


def short_err(err: BaseException) -> str:
    msg = f"{type(err).__name__}: {err}".replace("\n", " ")
    return msg[:300]


def is_linear(m: nn.Module) -> bool:
    import deftly

    return isinstance(m, (nn.Linear, deftly.StructuredLinear))


def top_linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear-like modules not nested inside another one (lrbd's inner parts are not counted twice)."""
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if is_linear(m) and not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, m))
    return out


def linear_summary(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """Parameters of the structured layers (bias excluded) vs the dense weights they replace, and the
    hyperparameters chosen per (in, out) shape."""
    import deftly

    hp: dict[str, Any] = {}
    sw = dw = 0
    for name, m in top_linear_modules(model):
        if names is not None and name not in names:
            continue
        if isinstance(m, deftly.StructuredLinear):
            sw += m.num_params() - (m.out_features if m.bias is not None else 0)
            dw += m.in_features * m.out_features
            key = f"{m.in_features}x{m.out_features}"
            hp.setdefault(key, {k: (list(v) if isinstance(v, tuple) else v) for k, v in m.hparams().items()})
    return {"hparams": hp, "linear_weight_params": sw, "dense_weight_params": dw,
            "fraction": (sw / dw) if dw else None}


def fmt_hp(hp: dict[str, Any]) -> str:
    parts = []
    for shape, h in hp.items():
        inner = ",".join(f"{k[:3] if k not in ('rank',) else 'r'}={v}" for k, v in h.items()
                         if k not in ("complex", "perm", "real_output"))
        parts.append(f"{shape}:{inner}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- timing
def calibrate(fn: Callable[[], Any], min_sample: float) -> int:
    """Calls per sample so that one sample of ``fn`` lasts at least ``min_sample`` seconds."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(math.ceil(min_sample / dt)))


def sample(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """Seconds per call: wall-clock and CPU time of this process (all its threads)."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def interleaved(fa: Callable[[], Any], fb: Callable[[], Any], rounds: int, min_sample: float,
                warmup: int = 2) -> dict[str, Any]:
    """Alternate samples of ``fa`` (dense) and ``fb`` (candidate), round by round; medians/minimums."""
    for _ in range(warmup):
        fa()
        fb()
    n = calibrate(fa, min_sample)
    nb = calibrate(fb, min_sample)
    n = max(1, min(n, nb))  # the same number of calls per sample for both
    sa: list[tuple[float, float]] = []
    sb: list[tuple[float, float]] = []
    for r in range(rounds):
        if r % 2 == 0:
            sa.append(sample(fa, n))
            sb.append(sample(fb, n))
        else:
            sb.append(sample(fb, n))
            sa.append(sample(fa, n))
    ta, tb = [w for w, _ in sa], [w for w, _ in sb]
    ca, cb = [c for _, c in sa], [c for _, c in sb]
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"dense_ms": 1e3 * ma, "ms": 1e3 * mb, "speedup": ma / mb, "speedup_min": min(ta) / min(tb),
            # the median of the per-round ratios (each round's two samples are adjacent in time)
            "speedup_paired": statistics.median(a / b for a, b in zip(ta, tb)),
            # CPU time of this process: robust to waiting for a core on a loaded machine (with one
            # thread it is close to the unloaded wall time; with more it includes OpenMP spin-waits)
            "dense_cpu_ms": 1e3 * statistics.median(ca), "cpu_ms": 1e3 * statistics.median(cb),
            "speedup_cpu": statistics.median(ca) / statistics.median(cb),
            "dense_min_ms": 1e3 * min(ta), "min_ms": 1e3 * min(tb), "calls_per_sample": n, "rounds": rounds,
            "dense_samples_ms": [1e3 * t for t in ta], "samples_ms": [1e3 * t for t in tb]}


# ------------------------------------------------------------------------------------------- profile
class LinearRanges:
    """Forward hooks that wrap every top-level linear module's forward in a profiler range."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        self.stack: list[Any] = []
        for _name, m in top_linear_modules(model):
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, mod, args):
        r = torch.profiler.record_function(LINEAR_TAG)
        r.__enter__()
        self.stack.append(r)

    def _post(self, mod, args, out):
        self.stack.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _under(ev, tag: str) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name == tag:
            return True
        p = p.cpu_parent
    return False


def profile_share(fn: Callable[[], Any], model: nn.Module | None, calls: int, top: int = 15) -> dict[str, Any]:
    """Shares of wall time in linear layers (fwd ranges + their backward nodes), optimizer, the rest;
    matmul-family and attention ops by name; the top ops by self CPU time (per call)."""
    from torch.profiler import ProfilerActivity, profile

    ranges = LinearRanges(model) if model is not None else None
    try:
        fn()  # one un-profiled call so that nothing lazy lands in the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            wall = time.perf_counter() - t0
    finally:
        if ranges is not None:
            ranges.remove()
    evs = list(prof.events())
    lin_fwd = sum(e.cpu_time_total for e in evs if e.name == LINEAR_TAG and not _under(e, LINEAR_TAG))
    opt = sum(e.cpu_time_total for e in evs if e.name == OPT_TAG)
    seqs = {e.sequence_nr for e in evs if e.sequence_nr >= 0 and _under(e, LINEAR_TAG)}
    lin_bwd = sum(e.cpu_time_total for e in evs
                  if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in seqs)
    total_us = wall * 1e6
    gemm = sum(e.self_cpu_time_total for e in evs if e.name in GEMM_OPS)
    attn = sum(e.self_cpu_time_total for e in evs if any(w in e.name for w in ATTN_WORDS))
    self_total = sum(e.self_cpu_time_total for e in evs) or 1.0
    avg = prof.key_averages()
    rows = sorted(avg, key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    top_ops = [{"op": a.key, "self_ms_per_call": a.self_cpu_time_total / 1e3 / calls,
                "count_per_call": a.count / calls,
                "self_pct": 100.0 * a.self_cpu_time_total / self_total} for a in rows]
    out = {"wall_ms_per_call": 1e3 * wall / calls, "gemm_pct": 100.0 * gemm / self_total,
           "attention_pct": 100.0 * attn / self_total, "ops_per_call": len(evs) / calls, "top_ops": top_ops}
    if model is not None:
        lin = lin_fwd + lin_bwd
        out.update({"linear_pct": 100.0 * lin / total_us, "linear_fwd_pct": 100.0 * lin_fwd / total_us,
                    "linear_bwd_pct": 100.0 * lin_bwd / total_us, "optimizer_pct": 100.0 * opt / total_us,
                    "other_pct": 100.0 * max(total_us - lin - opt, 0.0) / total_us,
                    "linear_ms_per_call": (lin / 1e3) / calls})
    return out


def prof_one(res: dict[str, Any], name: str, fn: Callable[[], Any], model: nn.Module | None, calls: int) -> None:
    try:
        res["profiles"][name] = p = profile_share(fn, model, calls)
        log(f"profile {name}: linear {p.get('linear_pct', float('nan')):.0f}% matmul ops {p['gemm_pct']:.0f}% "
            f"attention {p['attention_pct']:.0f}%")
    except Exception as err:  # noqa: BLE001
        res["profiles"][name] = {"error": short_err(err)}


# ------------------------------------------------------------------------------------------- MiniLM
def minilm_texts(n: int) -> tuple[list[str], str]:
    """At least ``n`` long real texts: Wikipedia paragraphs (>= 128 tokens), else review snippets."""
    try:
        from deftly.data import wikipedia

        paras = [p.strip() for p in wikipedia.text().split("\n") if len(p.strip()) >= 900]
        if len(paras) >= 8:
            return [paras[i % len(paras)] for i in range(n)], "wikipedia paragraphs (>= 900 characters)"
    except Exception as err:  # noqa: BLE001 - fall back to the reviews
        log(f"wikipedia text unavailable ({short_err(err)}); using review snippets")
    from deftly.data import reviews

    texts, _ = reviews.load()
    return [texts[i % len(texts)] for i in range(n)], "rotten-tomatoes review snippets (padded)"


def minilm_encode(tok, texts: list[str], batch: int, tokens: int) -> dict[str, torch.Tensor]:
    enc = tok(texts[:batch], padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


ENCODER_RE = r"encoder\..*"


def build_minilm(dense: nn.Module, structure: str, budget: float | None, seed: int = 0) -> nn.Module:
    import deftly

    m = copy.deepcopy(dense)
    torch.manual_seed(seed)
    if structure == "deftly-dense":
        deftly.structurize(m, deftly.StructureConfig(structure="dense", target_modules=ENCODER_RE, init="random"))
    else:
        deftly.structurize(m, deftly.StructureConfig(structure=structure, target_modules=ENCODER_RE,
                                                     budget=budget, init="random", seed=seed))
    return m.eval()


def minilm_call(model: nn.Module, enc: dict[str, torch.Tensor]) -> Callable[[], Any]:
    def fn():
        with torch.inference_mode():
            return model(**enc).last_hidden_state
    return fn


# ------------------------------------------------------------------------------------------- char-LM
def charlm_setup(cfg) -> tuple[int, torch.Tensor, str]:
    """Vocabulary size and one real training batch ``(B, ctx + 1)``."""
    from deftly.data import wikipedia
    from deftly.train import charlm

    train_ids, _val, vocab = wikipedia.char_splits(limit=cfg.text_limit)
    get = charlm.train_batches(train_ids, cfg.ctx, cfg.batch_size, cfg.seed)
    return len(vocab), get(0), f"{len(train_ids):,} Wikipedia training characters, vocabulary {len(vocab)}"


def _to_nn_linear(model: nn.Module) -> nn.Module:
    """Replace every deftly ``dense`` layer by an ``nn.Linear`` holding the same weight and bias."""
    import deftly

    for _name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, deftly.StructuredLinear) and child.name == "dense":
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.weight)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(m, cname, lin)
    return model


def build_gpt(structure: str, budget: float | None, vocab: int, cfg, seed: int = 0) -> nn.Module:
    from deftly.train import charlm

    torch.manual_seed(seed)
    if structure in ("dense", "deftly-dense"):
        m = charlm.GPT(vocab, "dense", 1.0, cfg.layers, cfg.d, cfg.heads, cfg.ctx)
        if structure == "dense":
            m = _to_nn_linear(m)
    else:
        m = charlm.GPT(vocab, structure, budget, cfg.layers, cfg.d, cfg.heads, cfg.ctx)
    return m.train()


def gpt_step(model: nn.Module, batch: torch.Tensor, lr: float = 1e-4) -> Callable[[], Any]:
    from torch.nn import functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def fn():
        opt.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        with torch.profiler.record_function(OPT_TAG):
            opt.step()
        return loss
    return fn


def gpt_linear_names(model: nn.Module) -> list[str]:
    return [n for n, _ in top_linear_modules(model) if n.startswith("blocks.")]


# ------------------------------------------------------------------------------------------- compile
def compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, dynamic=False)


# ------------------------------------------------------------------------------------------- driver
def run(args: argparse.Namespace) -> dict[str, Any]:
    import deftly

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    structures = [s for s in args.structures if s != "dense"]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "allocator": "glibc (default)" if "LD_PRELOAD" not in os.environ
        else os.environ["LD_PRELOAD"], "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "mkl": torch.backends.mkl.is_available(), "deftly": getattr(deftly, "__version__", "?"),
        "deftly_path": str(Path(deftly.__file__).parent), "load_start": loadavg(), "rounds": args.rounds,
        "min_sample_s": args.min_sample, "init": "random (structured weights: speed does not depend on values)",
        "structures": structures, "budgets": args.budgets, "modes": modes,
    }
    res: dict[str, Any] = {"meta": meta, "minilm": [], "charlm": [], "profiles": {}, "hparams": {},
                           "notes": []}

    def save() -> None:
        (out_dir / "e2e.json").write_text(json.dumps(res, indent=1, default=str))

    cands = [(s, b) for s in structures for b in (args.budgets if s != "deftly-dense" else [None])]

    # ------------------------------------------------------------------ MiniLM inference
    if not args.no_minilm:
        from deftly.data import minilm

        tok, dense = minilm.load()
        dense.eval()
        texts, source = minilm_texts(max(args.batches))
        meta["minilm_text"] = source
        meta["minilm_attention"] = getattr(dense.config, "_attn_implementation", "?")
        models: dict[tuple, nn.Module] = {}
        for s, b in cands:
            try:
                models[(s, b)] = build_minilm(dense, s, b, args.seed)
                res["hparams"][f"minilm/{s}/{b}"] = linear_summary(models[(s, b)])
                log(f"minilm {s} {b}: {fmt_hp(res['hparams'][f'minilm/{s}/{b}']['hparams'])}")
            except Exception as err:  # noqa: BLE001
                res["hparams"][f"minilm/{s}/{b}"] = {"error": short_err(err)}
                log(f"minilm {s} {b}: build failed: {short_err(err)}")
        if args.profile_batch not in args.batches:
            args.profile_batch = args.batches[-1]
        for batch in args.batches:
            enc = minilm_encode(tok, texts, batch, args.tokens)
            real = int(enc["attention_mask"].sum())
            for mode in modes:
                if mode == "compile" and args.compile_batches and batch not in args.compile_batches:
                    continue
                wait_quiet(args.wait_quiet, args.quiet_load)
                if mode == "compile":
                    torch._dynamo.reset()
                try:
                    dense_m = compiled(dense) if mode == "compile" else dense
                    fd = minilm_call(dense_m, enc)
                    t0 = time.perf_counter()
                    fd()
                    dense_first = time.perf_counter() - t0
                except Exception as err:  # noqa: BLE001
                    res["notes"].append(f"minilm dense {mode} batch {batch} failed: {short_err(err)}")
                    continue
                profiling = not args.no_profile and batch == args.profile_batch
                if profiling:
                    prof_one(res, f"minilm/dense/None/{mode}/b{batch}", fd, dense if mode == "eager" else None,
                             args.profile_calls)
                for (s, b), m in models.items():
                    row = {"workload": "minilm", "batch": batch, "tokens": args.tokens, "real_tokens": real,
                           "structure": s, "budget": b, "mode": mode,
                           "hparams": res["hparams"][f"minilm/{s}/{b}"].get("hparams"),
                           "fraction": res["hparams"][f"minilm/{s}/{b}"].get("fraction"),
                           "load": loadavg()}
                    try:
                        mm = compiled(m) if mode == "compile" else m
                        fc = minilm_call(mm, enc)
                        t0 = time.perf_counter()
                        fc()  # first call: compile / deftly's kernel auto-tuning
                        row["first_call_s"] = time.perf_counter() - t0
                        row["dense_first_call_s"] = dense_first
                        rounds = args.rounds if batch < 128 else min(args.rounds, args.rounds_large)
                        row.update(interleaved(fd, fc, rounds, args.min_sample))
                        if profiling:
                            prof_one(res, f"minilm/{s}/{b}/{mode}/b{batch}", fc, m if mode == "eager" else None,
                                     args.profile_calls)
                    except Exception as err:  # noqa: BLE001
                        row["error"] = short_err(err)
                        if args.verbose:
                            traceback.print_exc()
                    res["minilm"].append(row)
                    log(f"minilm b={batch} {mode:7s} {s:12s} {b}: "
                        + (f"{row['ms']:.1f} ms vs dense {row['dense_ms']:.1f} ms = {row['speedup']:.2f}x"
                           if "ms" in row else f"ERROR {row['error']}"))
                    save()
                    if mode == "compile":
                        del mm
                if mode == "compile":
                    torch._dynamo.reset()
            # decisions the auto-dispatch took (eager), per layer shape
        try:
            res["dispatch_decisions"] = {str(k): v for k, v in deftly.kernels.decisions().items()}
        except Exception:  # noqa: BLE001
            pass
        del models

    # ------------------------------------------------------------------ char-LM training step
    if not args.no_charlm:
        from deftly.train import charlm

        cfg = charlm.CharLMConfig()
        if args.charlm_text_limit:
            cfg.text_limit = args.charlm_text_limit
        vocab, batch_ids, source = charlm_setup(cfg)
        meta["charlm"] = {"layers": cfg.layers, "d": cfg.d, "heads": cfg.heads, "ctx": cfg.ctx,
                          "batch_size": cfg.batch_size, "vocab": vocab, "text": source,
                          "optimizer": "torch.optim.AdamW(model.parameters(), lr=1e-4), defaults otherwise"}
        gcands = [("deftly-dense", None)] if "deftly-dense" in structures else []
        gcands += [(s, b) for s, b in cands if s != "deftly-dense"]
        for mode in modes:
            wait_quiet(args.wait_quiet, args.quiet_load)
            torch._dynamo.reset()
            try:
                dm = build_gpt("dense", None, vocab, cfg, args.seed)
                fd = gpt_step(compiled(dm) if mode == "compile" else dm, batch_ids)
                t0 = time.perf_counter()
                fd()
                dense_first = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001
                res["notes"].append(f"charlm dense {mode} failed: {short_err(err)}")
                continue
            for s, b in gcands:
                row = {"workload": "charlm", "batch": cfg.batch_size, "tokens": cfg.ctx, "structure": s,
                       "budget": b, "mode": mode, "load": loadavg()}
                try:
                    m = build_gpt(s, b, vocab, cfg, args.seed)
                    summ = linear_summary(m, gpt_linear_names(m))
                    row["hparams"], row["fraction"] = summ["hparams"], summ["fraction"]
                    res["hparams"][f"charlm/{s}/{b}"] = summ
                    fc = gpt_step(compiled(m) if mode == "compile" else m, batch_ids)
                    t0 = time.perf_counter()
                    fc()
                    row["first_call_s"] = time.perf_counter() - t0
                    row["dense_first_call_s"] = dense_first
                    row.update(interleaved(fd, fc, args.rounds, args.min_sample))
                    if not args.no_profile:
                        prof_one(res, f"charlm/{s}/{b}/{mode}", fc, m if mode == "eager" else None,
                                 args.profile_calls)
                except Exception as err:  # noqa: BLE001
                    row["error"] = short_err(err)
                    if args.verbose:
                        traceback.print_exc()
                res["charlm"].append(row)
                log(f"charlm {mode:7s} {s:12s} {b}: "
                    + (f"{row['ms']:.1f} ms vs dense {row['dense_ms']:.1f} ms = {row['speedup']:.2f}x"
                       if "ms" in row else f"ERROR {row['error']}"))
                save()
            if not args.no_profile:
                prof_one(res, f"charlm/dense/None/{mode}", fd, dm if mode == "eager" else None, args.profile_calls)
        torch._dynamo.reset()

    meta["load_end"] = loadavg()
    save()
    return res


# ------------------------------------------------------------------------------------------- report
def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def write_md(res: dict[str, Any], out_dir: Path) -> None:
    meta = res["meta"]
    lines = [
        "# End-to-end speed: structurized models vs dense (issue 14)", "",
        f"Command: `{meta['command']}`  ", f"Date {meta['date']}; torch {meta['torch']}, {meta['threads']} threads "
        f"of {meta['cpus']} CPUs, allocator {meta['allocator']}; load average {_f(meta.get('load_start'), '.2f')} "
        f"at start, {_f(meta.get('load_end'), '.2f')} at end (the machine is shared: only the ratios, measured "
        f"interleaved in one process, are meaningful).  ",
        f"Timing: dense and candidate alternate, {meta['rounds']} rounds, samples >= {meta['min_sample_s']} s; "
        "`ms` = median per call; `speed-up` = dense median / candidate median, `(min)` = ratio of minimums, "
        "`(paired)` = median of the per-round ratios, `(CPU time)` = ratio of median process CPU times.  ",
        f"Structured weights: {meta['init']}. deftly from `{meta['deftly_path']}`.", "",
    ]
    lines += targets_md(res)
    if res["minilm"]:
        lines += ["## all-MiniLM-L6-v2 inference (encoder linear layers structurized)", "",
                  f"Input: {meta.get('minilm_text')}, {res['minilm'][0]['tokens']} tokens per sentence; "
                  f"attention `{meta.get('minilm_attention')}`; `torch.inference_mode()`.", "",
                  "| batch | mode | structure | budget | of dense | ms | dense ms | speed-up | (min) | (paired) | (CPU time) | first call s |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["minilm"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['mode']} | {r['structure']} | {_f(r['budget'], '.0%')} | "
                             f"{_f(r.get('fraction'), '.1%')} | error: {r['error'][:120]} | | | | | | |")
                continue
            lines.append(f"| {r['batch']} | {r['mode']} | {r['structure']} | {_f(r['budget'], '.0%')} | "
                         f"{_f(r.get('fraction'), '.1%')} | {r['ms']:.1f} | {r['dense_ms']:.1f} | "
                         f"**{r['speedup']:.2f}x** | {r['speedup_min']:.2f}x | {_f(r.get('speedup_paired'), '.2f')}x | "
                         f"{_f(r.get('speedup_cpu'), '.2f')}x | {_f(r.get('first_call_s'), '.1f')} |")
        lines.append("")
    if res["charlm"]:
        c = meta.get("charlm", {})
        lines += ["## char-LM GPT training step (recipe size)", "",
                  f"GPT {c.get('layers')} layers, d={c.get('d')}, {c.get('heads')} heads, ctx {c.get('ctx')}, "
                  f"batch {c.get('batch_size')}, {c.get('text')}; step = zero_grad + forward + loss + backward + "
                  f"{c.get('optimizer')}. Dense: `nn.Linear`; `deftly-dense`: the recipe's deftly `dense` layers.",
                  "", "| mode | structure | budget | of dense | hyperparameters | ms | dense ms | speed-up | (min) | (paired) | (CPU time) |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["charlm"]:
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['structure']} | {_f(r['budget'], '.0%')} | | | error: "
                             f"{r['error'][:120]} | | | | | |")
                continue
            lines.append(f"| {r['mode']} | {r['structure']} | {_f(r['budget'], '.0%')} | {_f(r.get('fraction'), '.1%')} | "
                         f"{fmt_hp(r.get('hparams') or {})} | {r['ms']:.1f} | {r['dense_ms']:.1f} | "
                         f"**{r['speedup']:.2f}x** | {r['speedup_min']:.2f}x | {_f(r.get('speedup_paired'), '.2f')}x | "
                         f"{_f(r.get('speedup_cpu'), '.2f')}x |")
        lines.append("")
    if res["hparams"]:
        lines += ["## Hyperparameters the budget picked", "", "| model / structure / budget | of dense | per shape |",
                  "|---|---:|---|"]
        for k, v in res["hparams"].items():
            lines.append(f"| {k} | {_f(v.get('fraction'), '.1%')} | {v.get('error') or fmt_hp(v.get('hparams') or {})} |")
        lines.append("")
    if res["profiles"]:
        lines += ["## Where the time goes (torch.profiler, CPU)", "",
                  "`linear`: wall time inside the linear layers (forward ranges around each structured module / "
                  "nn.Linear, incl. their pads, copies, bias and Python; plus, when training, the backward nodes "
                  "of those ops); `matmul ops`: self time of mm/addmm/bmm/... by op name (the only split available "
                  "for compiled graphs); `attention`: SDPA kernels.", "",
                  "| profile | ms/call (profiled) | linear % | optimizer % | other % | matmul ops % | attention % | ops/call | top 3 ops (self %) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k, p in res["profiles"].items():
            if "error" in p:
                lines.append(f"| {k} | error: {p['error'][:100]} | | | | | | | |")
                continue
            top3 = ", ".join(f"{o['op']} {o['self_pct']:.0f}%" for o in p["top_ops"][:3])
            lines.append(f"| {k} | {p['wall_ms_per_call']:.1f} | {_f(p.get('linear_pct'), '.0f')} | "
                         f"{_f(p.get('optimizer_pct'), '.0f')} | {_f(p.get('other_pct'), '.0f')} | "
                         f"{p['gemm_pct']:.0f} | {p['attention_pct']:.0f} | {p['ops_per_call']:.0f} | {top3} |")
        lines.append("")
    if res.get("dispatch_decisions"):
        lines += ["## deftly's auto-dispatch decisions (eager MiniLM)", "", "```"]
        lines += [f"{v:8s} {k}" for k, v in res["dispatch_decisions"].items()]
        lines += ["```", ""]
    if res["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    lines += ["![speed-ups](e2e.png)", ""]
    (out_dir / "e2e.md").write_text("\n".join(lines))


def _metric(res: dict[str, Any]) -> tuple[str, str]:
    """The speed-up column the targets and the plot use: CPU time with one thread (load-robust),
    else the wall-clock median."""
    if res["meta"].get("threads") == 1:
        return "speedup_cpu", "CPU-time ratio (1 thread)"
    return "speedup", "wall-clock median ratio"


def targets_md(res: dict[str, Any]) -> list[str]:
    """Issue 14's targets at 25%: MiniLM >= 1.5x at 32 x 128 (eager and compiled), never slower at batch 1;
    char-LM training step >= 1.3x."""
    key, label = _metric(res)
    rows = []
    for r in res["minilm"]:
        if r.get("budget") != 0.25 or key not in r:
            continue
        if r["batch"] == 32:
            rows.append((f"MiniLM 32 x {r['tokens']}, {r['mode']}", r["structure"], r[key], 1.5))
        elif r["batch"] == 1:
            rows.append((f"MiniLM 1 x {r['tokens']}, {r['mode']}", r["structure"], r[key], 1.0))
    for r in res["charlm"]:
        if r.get("budget") == 0.25 and key in r:
            rows.append((f"char-LM step, {r['mode']}", r["structure"], r[key], 1.3))
    if not rows:
        return []
    out = ["## Targets at 25% (issue 14)", "", f"Speed-up = {label}.", "",
           "| workload | structure | speed-up | target | met |", "|---|---|---:|---:|---|"]
    for w, s, v, t in rows:
        out.append(f"| {w} | {s} | {v:.2f}x | >= {t:.1f}x | {'yes' if v >= t else '**no**'} |")
    return out + [""]


def write_png(res: dict[str, Any], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        res["notes"].append("matplotlib not installed: no e2e.png")
        return
    mini = [r for r in res["minilm"] if "speedup" in r]
    char = [r for r in res["charlm"] if "speedup" in r]
    # with one thread the process's CPU time is the load-robust clock; with more, the wall-clock median
    metric, label = _metric(res)
    ylabel = f"speed-up vs dense ({label})"
    batches = sorted({r["batch"] for r in mini})
    panels = [("minilm", b) for b in batches] + ([("charlm", None)] if char else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (w, b) in zip(axes[0], panels):
        rows = [r for r in (mini if w == "minilm" else char) if w == "charlm" or r["batch"] == b]
        labels = []
        for r in rows:
            lab = r["structure"] + ("" if r["budget"] is None else f"\n{r['budget']:.0%}")
            if lab not in labels:
                labels.append(lab)
        modes = sorted({r["mode"] for r in rows}, key=lambda m: m != "eager")
        width = 0.8 / max(len(modes), 1)
        for i, mode in enumerate(modes):
            xs, ys = [], []
            for r in rows:
                if r["mode"] != mode:
                    continue
                lab = r["structure"] + ("" if r["budget"] is None else f"\n{r['budget']:.0%}")
                xs.append(labels.index(lab) + (i - (len(modes) - 1) / 2) * width)
                ys.append(r.get(metric, r["speedup"]))
            ax.bar(xs, ys, width=width, label=mode)
        ax.axhline(1.0, color="k", lw=0.8)
        if w == "minilm":
            ax.axhline(1.5, color="r", lw=0.8, ls="--")
            ax.set_title(f"MiniLM inference, {b} x {rows[0]['tokens']} tokens")
        else:
            ax.axhline(1.3, color="r", lw=0.8, ls="--")
            ax.set_title("char-LM training step (recipe size)")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run (3 structures, 25%%, batches 1/8, "
                    "2 rounds, compile at one batch)")
    ap.add_argument("--structures", nargs="+", default=None,
                    help=f"default: deftly-dense {' '.join(ALL_STRUCTURES)} (dense is always the baseline)")
    ap.add_argument("--budgets", nargs="+", type=float, default=None, help="default: 0.5 0.25")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="MiniLM sentences per call; default 1 32 128")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-batches", nargs="+", type=int, default=None,
                    help="MiniLM batches to also time compiled (default: all of --batches)")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-charlm", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-batch", type=int, default=32)
    ap.add_argument("--profile-calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per config (default 5; quick 2)")
    ap.add_argument("--rounds-large", type=int, default=3, help="rounds at MiniLM batches >= 128 (default 3)")
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (default 0.3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--charlm-text-limit", type=int, default=None)
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each config, wait up to this many seconds for the load average to drop")
    ap.add_argument("--quiet-load", type=float, default=1.5)
    ap.add_argument("--out", default="benchmarks/results/e2e")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report-only", metavar="JSON", default=None,
                    help="rewrite e2e.md / e2e.png in --out from an existing e2e.json (no measuring)")
    args = ap.parse_args(argv)
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_png(res, out)
        write_md(res, out)
        return 0
    if args.quick:
        args.structures = args.structures or ["deftly-dense", "lowrank", "monarch", "blockdiag"]
        args.budgets = args.budgets or [0.25]
        args.batches = args.batches or [1, 8]
        args.compile_batches = args.compile_batches or [8]
        args.rounds = args.rounds or 2
        args.min_sample = args.min_sample if args.min_sample is not None else 0.05
        args.profile_batch = 8 if args.profile_batch == 32 else args.profile_batch
        args.profile_calls = 1
        args.charlm_text_limit = args.charlm_text_limit or 200_000
    args.structures = args.structures or ["deftly-dense", *ALL_STRUCTURES]
    args.budgets = args.budgets or [0.5, 0.25]
    args.batches = args.batches or [1, 32, 128]
    args.rounds = args.rounds or 5
    args.min_sample = args.min_sample if args.min_sample is not None else 0.3
    t0 = time.time()
    res = run(args)
    res["meta"]["wall_s"] = time.time() - t0
    out = Path(args.out)
    write_png(res, out)
    write_md(res, out)
    (out / "e2e.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out / 'e2e.md'}, {out / 'e2e.json'}, {out / 'e2e.png'} in {res['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
