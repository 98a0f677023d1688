"""Recipe: a small character-level GPT on Wikipedia text, its projections dense or structured.

The model is a pre-LayerNorm GPT (``layers`` blocks, width ``d``, ``heads`` heads, context ``ctx``,
learned positions, GELU MLP ``d -> 4d -> d``); its attention ``qkv``/``proj`` and MLP ``fc1``/``fc2``
projections are the *linear layers* that are dense or structured at ``fraction`` of their dense
parameters. Embeddings, LayerNorms and the readout stay dense.

Comparison protocol (one run per structure): warm-up then a constant learning rate, validation loss in
bits per character every ``eval_every`` steps on fixed held-out windows (the last 10% of the text). The
dense model trains ``steps`` steps, taking time ``T``. Each structured model trains at least ``steps``
steps and, when its steps are cheaper, long enough to also cover ``T``, so both are read off the same run:
*equal steps* = val loss at step ``steps``; *equal wall-clock* = val loss at training time ``T``
(linear interpolation between evaluations). Because a shared CPU makes measured time noisy, the length of
the structured run and a second equal-time figure use each model's median step time, measured by an
interleaved micro-benchmark before training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed as ddist
from ..core.base import StructuredLinear
from ..data import wikipedia
from ..surgery.budget import BudgetError
from .common import (
    available,
    budget_linear,
    check_counts,
    check_structures,
    forward_flops,
    linear_stats,
    median_step_time,
    seed_everything,
)
from .loop import TrainConfig, train
from .mup import DEFAULT_MAX_MULTIPLIER
from .results import curves_plot, pareto_plot, write_json, write_run

__all__ = ["COLUMNS", "GPT", "CharLMConfig", "run", "val_bits_per_char"]

LN2 = math.log(2.0)


@dataclass
class CharLMConfig:
    structures: tuple[str, ...] = ("dense", "blockdiag", "lowrank")
    fraction: float = 0.25
    layers: int = 4
    d: int = 256
    heads: int = 4
    ctx: int = 128
    batch_size: int = 16
    steps: int = 600
    lr: float = 1e-3  # measured best for dense of the two tried (docs/results.md section 2)
    warmup: int = 50
    eval_every: int = 50
    eval_windows: int = 128
    max_time_ratio: float = 3.0  # a structured run is at most this many times dense's steps
    seed: int = 0
    text_limit: int | None = None
    threads: int | None = None
    mup: bool = True
    # cap on the per-factor learning-rate multipliers (None: no cap); param_groups' default (2): the
    # uncapped ones (4x on 4-block block-diagonal weights, 3-14x on low-rank U) train GPTs worse
    max_lr_mult: float | None = DEFAULT_MAX_MULTIPLIER
    clock: str = "wall"  # "process": CPU time of this process, robust on a shared machine
    # sequence mixer of every block: "attention" (softmax, the default) or "monarch-mixer" (gated long
    # convolution, deftly.mixers.MonarchMixer; no learned positions, equal or fewer parameters)
    mixer: str = "attention"

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"CharLMConfig: mixer={self.mixer!r} is not a sequence mixer; choose one of: "
                             f"{', '.join(MIXERS)} (--mixer)")
        self.structures = check_structures(self.structures)
        if self.clock not in ("wall", "process"):
            raise ValueError(f"clock={self.clock!r} must be 'wall' or 'process'")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1], e.g. 0.25")
        check_counts("CharLMConfig", ("text_limit", "threads"), steps=self.steps, eval_every=self.eval_every,
                     layers=self.layers, d=self.d, heads=self.heads, ctx=self.ctx, batch_size=self.batch_size,
                     eval_windows=self.eval_windows, text_limit=self.text_limit, threads=self.threads)
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"CharLMConfig: warmup={self.warmup!r} must be a whole number >= 0 (--warmup N)")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"CharLMConfig: lr={self.lr!r} must be a positive number, e.g. 1e-3")
        if self.max_lr_mult is not None and not (self.max_lr_mult > 0 and math.isfinite(self.max_lr_mult)):
            raise ValueError(f"max_lr_mult={self.max_lr_mult!r} must be a positive number, e.g. 1.0")


#: sequence mixers of the recipe (``--mixer``)
MIXERS = ("attention", "monarch-mixer")
#: the implicit filter of the mixer blocks: small enough that the mixer model has no more parameters than
#: the attention model (whose learned positions it does not need)
MIXER_FILTER = {"bands": 4, "hidden": 16}


class Block(nn.Module):
    def __init__(self, structure: str, fraction: float, d: int, heads: int, mixer: str = "attention",
                 ctx: int = 128) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        if mixer == "attention":
            self.qkv = budget_linear(structure, d, 3 * d, fraction)
            self.proj = budget_linear(structure, d, d, fraction)
        else:  # its projections W_in (d -> 3d) and W_out (d -> d) take the places of qkv and proj
            from ..mixers import MonarchMixer

            self.mixer = MonarchMixer(d, ctx, causal=True, filter_kwargs=MIXER_FILTER,
                                      linear=lambda i, o: budget_linear(structure, i, o, fraction))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = budget_linear(structure, d, 4 * d, fraction)
        self.fc2 = budget_linear(structure, 4 * d, d, fraction)

    def seq_linears(self) -> tuple[nn.Module, nn.Module]:
        """The sequence mixer's two projections (attention: qkv, proj; mixer: W_in, W_out)."""
        return (self.qkv, self.proj) if hasattr(self, "qkv") else (self.mixer.in_proj, self.mixer.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "mixer"):
            x = x + self.mixer(self.ln1(x))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, structure: str = "dense", fraction: float = 0.25, layers: int = 4,
                 d: int = 256, heads: int = 4, ctx: int = 128, mixer: str = "attention") -> None:
        super().__init__()
        self.ctx = ctx
        self.tok = nn.Embedding(vocab, d)
        # learned positions for attention; the mixer's convolutions know positions already
        self.pos = nn.Embedding(ctx, d) if mixer == "attention" else None
        self.blocks = nn.ModuleList(Block(structure, fraction, d, heads, mixer, ctx) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.tok.weight.normal_(0, 0.02)
            if self.pos is not None:
                self.pos.weight.normal_(0, 0.02)

    def linear_layers(self) -> list[nn.Module]:
        return [m for b in cast(list[Block], list(self.blocks)) for m in (*b.seq_linears(), b.fc1, b.fc2)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx)
        if self.pos is not None:
            h = h + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats) of ``batch: (B, ctx + 1)`` token ids."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def val_windows(ids: np.ndarray, ctx: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced, fixed windows of ``ctx + 1`` ids covering the validation text."""
    if len(ids) < ctx + 2:
        raise ValueError(f"validation text has {len(ids)} characters, fewer than ctx + 2 = {ctx + 2}")
    starts = np.linspace(0, len(ids) - ctx - 1, num=n).astype(np.int64)
    return torch.from_numpy(np.stack([ids[s:s + ctx + 1] for s in starts]))


@torch.no_grad()
def val_bits_per_char(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-character loss over ``windows`` in bits per character."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        total += float(lm_loss(model, w)) * w.shape[0] * (w.shape[1] - 1)
        count += w.shape[0] * (w.shape[1] - 1)
    return total / count / LN2


def train_batches(ids: np.ndarray, ctx: int, batch_size: int, seed: int):
    """``step -> (B, ctx + 1)`` random windows, a pure function of ``(seed, step)``."""
    data = torch.from_numpy(ids)
    hi = len(ids) - ctx - 1
    offsets = torch.arange(ctx + 1)

    def get(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, hi, (batch_size,), generator=g)
        return data[starts[:, None] + offsets]

    return get


def interpolate_at(history: list[dict[str, Any]], key: str, x: float, value: str = "val_bpc") -> float | None:
    """``value`` linearly interpolated at ``history[key] == x``; ``None`` if ``x`` is past the last point."""
    pts = [(h[key], h[value]) for h in history]
    if not pts or x > pts[-1][0] + 1e-9:
        return None
    prev = (0.0, pts[0][1])
    for px, py in pts:
        if px >= x:
            if px == prev[0]:
                return py
            w = (x - prev[0]) / (px - prev[0])
            return prev[1] + w * (py - prev[1])
        prev = (px, py)
    return pts[-1][1]


COLUMNS = [("structure", "structure"), ("hparams", "hyperparameters (fc1)"), ("linear_params", "linear params"),
           ("linear_fraction", "of dense"), ("params", "total params"), ("flops", "FLOPs/token"),
           ("step_ms", "median step ms"), ("steps", "steps run"), ("val_bpc_equal_steps", "val bpc @ equal steps"),
           ("rel_equal_steps", "vs dense"), ("val_bpc_equal_time", "val bpc @ dense's time (measured)"),
           ("val_bpc_equal_time_median", "val bpc @ dense's time (median step)")]


def _lr_cap(cfg: CharLMConfig, name: str) -> float | None:
    """The cap on the per-factor multipliers for ``name``: ``cfg.max_lr_mult`` for the structured models;
    dense always trains at ``cfg.lr``, the reference."""
    return None if name == "dense" else cfg.max_lr_mult


def _resume_key(cfg: CharLMConfig, name: str, steps: int) -> dict[str, Any]:
    """What a finished run's ``row.json`` must match to be reused by ``--resume``. The cap does not apply
    to dense and ``mup`` does not change it (all its multipliers are 1), so a dense run is reused across
    both; ``None`` is left out so that runs written before the option existed stay reusable."""
    key = {**asdict(cfg), "structures": None, "threads": None, "steps_run": steps}
    if name == "dense":
        key["mup"] = True
    cap = key.pop("max_lr_mult")
    if cap is not None and name != "dense":
        key["max_lr_mult"] = cap
    if key.get("mixer") == "attention":  # runs from before --mixer existed stay reusable
        key.pop("mixer")
    return key


def _started_steps(sub: Path, cfg: CharLMConfig, name: str) -> int | None:
    """Length of an earlier run of the same settings in ``sub``: from its ``row.json`` when it finished, else
    from its checkpoint; ``None`` if there is none."""
    done = sub / "row.json"
    if done.exists():
        saved = json.loads(done.read_text()).get("key") or {}
        if "steps_run" in saved and _reusable(saved, _resume_key(cfg, name, int(saved["steps_run"]))):
            return int(saved["steps_run"])
    ckpt = sub / "checkpoint.safetensors"
    if ckpt.exists():
        from ..io.checkpoint import load_checkpoint

        steps = load_checkpoint(ckpt).get("config", {}).get("steps")
        return int(steps) if steps else None
    return None


def _reusable(saved: dict[str, Any] | None, key: dict[str, Any]) -> bool:
    """A finished run is reused when its key matches, or differs only in having run at least as many steps
    (the learning rate is constant after warm-up, so the first steps are the same run; a re-measured step
    time that asks for one evaluation interval fewer does not retrain)."""
    if not saved:
        return False
    key = json.loads(json.dumps(key))
    if saved == key:
        return True
    rest = {k: v for k, v in saved.items() if k != "steps_run"}
    return rest == {k: v for k, v in key.items() if k != "steps_run"} and saved.get("steps_run", -1) >= key["steps_run"]


def _model(cfg: CharLMConfig, vocab: int, structure: str) -> GPT:
    seed_everything(cfg.seed)
    return GPT(vocab, structure, cfg.fraction, cfg.layers, cfg.d, cfg.heads, cfg.ctx, mixer=cfg.mixer)


def _say(msg: str) -> None:
    """A progress line on stderr (where the progress bars go)."""
    print(msg, file=sys.stderr, flush=True)


def run(cfg: CharLMConfig, out_dir: str | Path = "runs/charlm", resume: bool = False, progress: bool = True,
        command: str | None = None, strategy: str = "none") -> dict[str, Any]:
    """Train dense and every structure of ``cfg``; write the run directory. ``strategy="ddp"|"fsdp2"``: call
    it in every process of a ``torchrun`` launch; rank 0's step-time benchmark sets every rank's run
    length, each rank trains on its slice of every batch, rank 0 writes the run directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    names, notes = available(cfg.structures)
    if "dense" in names:  # dense first: it sets the time budget
        names = ["dense"] + [n for n in names if n != "dense"]
    say = _say if progress and ddist.is_main() else (lambda msg: None)
    train_ids, val_ids, vocab = wikipedia.char_splits(limit=cfg.text_limit)
    say(f"Wikipedia text: {len(train_ids):,} training and {len(val_ids):,} validation characters")
    windows = val_windows(val_ids, cfg.ctx, cfg.eval_windows)
    get_batch = train_batches(train_ids, cfg.ctx, cfg.batch_size, cfg.seed)
    t_start = time.perf_counter()

    # median step time of every model, interleaved so that load from other processes hits all alike
    models: dict[str, GPT] = {}
    for name in list(names):
        try:
            models[name] = _model(cfg, len(vocab), name)
        except BudgetError as err:
            notes.append(f"{name}: skipped — {err}")
            names.remove(name)
    if not models:
        raise ValueError("nothing was trained: " + "; ".join(notes) + f" (fraction={cfg.fraction}; raise it or "
                         "choose other structures)")
    step_time: dict[str, float] = {}
    bench_batch = get_batch(0)
    say(f"measuring the step time of {len(models)} model(s), interleaved (3 rounds of 6 steps each) ...")
    for _ in range(3):
        for name, m in models.items():
            opt = torch.optim.AdamW(m.parameters(), lr=0.0)

            def step(m=m, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                lm_loss(m, bench_batch).backward()
                opt.step()

            t = median_step_time(step, repeats=5, warmup=1, clock=cfg.clock)
            step_time[name] = min(step_time.get(name, math.inf), t)
    models.clear()
    if ddist.info().distributed:  # every rank must train the same number of steps: rank 0's timings
        box = [step_time]
        torch.distributed.broadcast_object_list(box, src=0)
        step_time = box[0]

    rows: list[dict[str, Any]] = []
    dense_time = None
    for name in names:
        sub = out / name
        model = _model(cfg, len(vocab), name)  # same init as benchmarked, re-seeded
        stats = linear_stats(model, model.linear_layers())
        steps = cfg.steps
        if name != "dense" and "dense" in step_time:
            ratio = min(max(step_time["dense"] / step_time[name], 1.0), cfg.max_time_ratio)
            steps = int(math.ceil(cfg.steps * ratio / cfg.eval_every) * cfg.eval_every)
        if resume and name != "dense":  # a resumed run keeps the length it started with (its step-time
            steps = _started_steps(sub, cfg, name) or steps  # ratio, re-measured now, may round differently)
        tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup=cfg.warmup, min_lr_ratio=1.0, mup=cfg.mup,
                           eval_every=cfg.eval_every, checkpoint_every=cfg.eval_every, seed=cfg.seed,
                           progress=progress, label=f"charlm {name}", weight_decay=0.0, clock=cfg.clock,
                           max_lr_mult=_lr_cap(cfg, name) if cfg.mup else None)
        key = _resume_key(cfg, name, steps)
        done = sub / "row.json"
        if resume and done.exists() and _reusable(json.loads(done.read_text()).get("key"), key):
            row = json.loads(done.read_text())["row"]
        else:
            res = train(model, get_batch, lm_loss, tcfg,
                        evaluate=lambda m: {"val_bpc": val_bits_per_char(m, windows)},
                        checkpoint_path=sub / "checkpoint.safetensors", resume=resume, strategy=strategy,
                        exclude_from_mup=(model.head,))
            hist = [{**h, "median_time": h["step"] * step_time[name]} for h in res.history]
            fc1 = cast(Block, model.blocks[0]).fc1
            row = {"structure": name, **stats, "hparams": fc1.hparams() if isinstance(fc1, StructuredLinear) else {},
                   "linear_params": stats["hidden_params"], "linear_fraction": stats["hidden_fraction"],
                   "flops": forward_flops(model, windows[:1, :-1]) // cfg.ctx, "step_ms": 1000 * step_time[name], "steps": res.step,
                   "train_time": res.train_time, "history": hist,
                   "val_bpc_equal_steps": interpolate_at(hist, "step", cfg.steps)}
            if ddist.is_main():
                write_json(done, {"key": key, "row": row})
        rows.append(row)
        if name == "dense":
            dense_time = row["train_time"]
    for r in rows:  # one time base for all rows: this run's interleaved benchmark (also for reused rows)
        r["step_ms"] = 1000 * step_time[r["structure"]]
        r["history"] = [{**h, "median_time": h["step"] * step_time[r["structure"]]} for h in r["history"]]
    dense = next((r for r in rows if r["structure"] == "dense"), None)
    for r in rows:
        if dense:
            r["rel_equal_steps"] = (r["val_bpc_equal_steps"] / dense["val_bpc_equal_steps"] - 1.0
                                    if r["val_bpc_equal_steps"] is not None else None)
            r["val_bpc_equal_time"] = interpolate_at(r["history"], "train_time", dense["train_time"])
            r["val_bpc_equal_time_median"] = interpolate_at(r["history"], "median_time",
                                                            dense["history"][-1]["median_time"])
    notes.insert(0, ("" if cfg.mixer == "attention" else
                     f"Sequence mixer: {cfg.mixer} (deftly.mixers.MonarchMixer: gated long convolution, implicit "
                     f"filter {MIXER_FILTER}, no learned positions) in place of attention; its W_in / W_out "
                     f"are the structured 'attention projections' below. ")
                 + f"GPT {cfg.layers} layers, d={cfg.d}, {cfg.heads} heads, context {cfg.ctx}, batch "
                    f"{cfg.batch_size}; AdamW lr {cfg.lr} (warm-up {cfg.warmup}, then constant) with "
                    + ("structure-aware per-factor LRs" if cfg.mup else "one global LR")
                    + (f" capped at {cfg.max_lr_mult:g}x" if cfg.mup and cfg.max_lr_mult is not None else "")
                    + f"; attention and MLP projections at <= {cfg.fraction:.0%} of "
                    f"their dense parameters; {len(train_ids):,} training / {len(val_ids):,} validation "
                    f"characters, vocabulary {len(vocab)}; val loss on {cfg.eval_windows} fixed windows.")
    for r in rows:
        last = r["history"][-1] if r["history"] else None
        if dense and r is not dense and last and r.get("val_bpc_equal_time") is None \
                and r["train_time"] < dense["train_time"]:
            notes.append(f"{r['structure']}: its run ended at {r['train_time']:.0f} s, before the "
                         f"{dense['train_time']:.0f} s dense took, with val {last['val_bpc']:.3f} bits/char"
                         + (" — already below dense's final " if last["val_bpc"] < dense["history"][-1]["val_bpc"]
                            else " — dense's final is ") + f"{dense['history'][-1]['val_bpc']:.3f}.")
    notes.append("equal wall-clock: each model's val loss at the training time dense needed for its "
                 f"{cfg.steps} steps — measured time and median step time x steps; time is "
                 + ("wall-clock seconds." if cfg.clock == "wall" else "CPU seconds of this process "
                    "(time.process_time; with 1 thread, the wall-clock time of an otherwise idle core)."))
    if not ddist.is_main():  # rank 0 writes the run directory
        return {"rows": rows, "notes": notes, "out_dir": str(out), "dense_time": dense_time}
    plots = []
    if rows:
        plots.append(curves_plot({r["structure"]: ([h["step"] for h in r["history"]],
                                                   [h["val_bpc"] for h in r["history"]]) for r in rows},
                                 out / "val_vs_steps.png", title="char-LM validation loss vs steps",
                                 xlabel="step", ylabel="val bits/char"))
        plots.append(curves_plot({r["structure"]: ([h["median_time"] for h in r["history"]],
                                                   [h["val_bpc"] for h in r["history"]]) for r in rows},
                                 out / "val_vs_time.png", title="char-LM validation loss vs training time",
                                 xlabel="training time (s, median step time x steps)", ylabel="val bits/char"))
        plots.append(pareto_plot([{**r, "x": r["linear_params"]} for r in rows], "x", "val_bpc_equal_steps",
                                 out / "pareto.png", title="char-LM: val loss at equal steps vs parameters",
                                 xlabel="linear-layer parameters (log scale)", ylabel="val bits/char",
                                 higher_is_better=False))
    config = {**asdict(cfg), "structures": list(cfg.structures), "vocab": len(vocab), "strategy": strategy,
              "world_size": ddist.info().world_size,
              "train_chars": len(train_ids), "val_chars": len(val_ids), "wall_time": time.perf_counter() - t_start}
    table = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    write_run(out, recipe="charlm", config=config, rows=table, columns=COLUMNS, notes=notes, plots=plots,
              command=command, extra={"histories": {r["structure"]: r["history"] for r in rows}})
    return {"rows": rows, "notes": notes, "out_dir": str(out), "dense_time": dense_time}
