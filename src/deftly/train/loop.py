"""A small, generic, resumable training loop.

The loop knows nothing about the task: it calls ``get_batch(step)`` for the data (a pure function of the
step, so a resumed run sees exactly the batches it would have seen), ``loss_fn(model, batch)`` for the
loss and ``evaluate(model)`` for metrics. It owns the optimizer (AdamW over
:func:`deftly.train.mup.param_groups` by default), the warm-up + cosine schedule, gradient clipping, the
progress bar (loss, speed and ETA on stderr), evaluation history with the *training* wall-clock time of
each evaluation, and periodic atomic checkpoints of everything a bit-exact resume needs: model,
optimizer, torch / numpy / Python RNG states, step counter, elapsed training time and history.

Distributed training: ``train(..., strategy="ddp" | "fsdp2")`` in every process of a ``torchrun`` launch
(after :func:`deftly.distributed.setup`). The per-factor learning rates are measured on the plain model,
then the model is wrapped (:func:`deftly.distributed.wrap_model`) and the optimizer built on the wrapped
parameters; every rank takes its slice of each global batch (``get_batch`` returns the global batch;
tensors whose dim 0 is the batch are sliced), so N ranks make exactly the updates of one process.
Checkpoints hold the full model and a name-keyed optimizer state (:func:`deftly.distributed.full_state_dict`,
:func:`~deftly.distributed.full_optimizer_state_dict`), written by rank 0, the same file in one process and
in N: a run checkpointed under DDP resumes in one process and vice versa. Resuming checks the file against
the model (keys, shapes, dtypes, optimizer groups) before changing anything.
``wrap_model(model) -> module`` remains as a hook for other wrappers (single process).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .. import distributed as ddist
from ..io.checkpoint import load_checkpoint, save_checkpoint
from .mup import DEFAULT_MAX_MULTIPLIER, param_groups, set_lr

__all__ = ["Progress", "TrainConfig", "TrainResult", "epoch_batches", "rng_state", "set_rng_state", "train"]


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train` (all JSON-able, stored in checkpoints and results)."""

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio; 1.0 keeps lr constant
    grad_clip: float | None = 1.0
    mup: bool = True  # structure-aware per-factor learning rates
    max_lr_mult: float | None = DEFAULT_MAX_MULTIPLIER  # cap on the per-factor multipliers (None: uncapped)
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: no periodic checkpoints (one is still written at the end if a path is set)
    seed: int = 0
    max_time: float | None = None  # stop after this many seconds of training (evaluation excluded)
    progress: bool = True
    label: str = ""
    clock: str = "wall"  # "wall": time.perf_counter; "process": CPU time of this process (time.process_time)

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"TrainConfig: steps={self.steps!r} must be an int >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr={self.lr!r} must be a positive number, e.g. 1e-3")
        if self.clock not in ("wall", "process"):
            raise ValueError(f"TrainConfig: clock={self.clock!r} must be 'wall' or 'process'")
        if self.warmup < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("TrainConfig: warmup, eval_every and checkpoint_every must be >= 0")


@dataclass
class TrainResult:
    step: int
    train_time: float  # seconds spent in training steps (evaluation and checkpointing excluded), on config.clock
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    losses: list[float] = field(default_factory=list)  # training loss per step
    resumed_from: int | None = None


def rng_state() -> dict[str, Any]:
    """Torch, numpy and Python RNG states in a checkpoint-friendly form."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # legacy=True: the tuple form
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_py, np_state[2:])]}


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))


def epoch_batches(n: int, batch_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """``step -> indices``: shuffled epochs without replacement, a pure function of ``(seed, step)``."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({n} examples)")
    per_epoch = n // batch_size
    cache: dict[int, torch.Tensor] = {}

    def indices(step: int) -> torch.Tensor:
        epoch, j = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        return cache[epoch][j * batch_size:(j + 1) * batch_size]

    indices.steps_per_epoch = per_epoch  # type: ignore[attr-defined]
    return indices


class Progress:
    """A dependency-free progress bar on stderr: ``label  step/total [####   ] loss  it/s  ETA``."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.start_step = 0
        self.last_print = 0.0
        self.loss_ema: float | None = None

    def update(self, step: int, loss: float, extra: str = "", force: bool = False) -> None:
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = 0.2 if self.tty else 10.0
        if not force and now - self.last_print < interval and step < self.total:
            return
        self.last_print = now
        done = step - self.start_step
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        fill = int(width * step / max(self.total, 1))
        bar = "#" * fill + "." * (width - fill)
        line = (f"{self.label} {step}/{self.total} [{bar}] loss {self.loss_ema:.4f} {rate:.1f} it/s "
                f"ETA {_fmt_time(eta)}{'  ' + extra if extra else ''}")
        if self.tty:
            self.stream.write("\r" + line.ljust(110)[:160])
            if step >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for ``cfg.warmup`` steps, then cosine from ``lr`` to ``lr * min_lr_ratio``."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def identity_wrap(model: nn.Module) -> nn.Module:
    return model


def _global_rows(batch: Any) -> int | None:
    """The size of dim 0 of the first tensor in ``batch`` (a tensor or nested tuple/list/dict)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in items:
        n = _global_rows(v)
        if n is not None:
            return n
    return None


def _local_batch(batch: Any, rows: slice, n: int, device: torch.device) -> Any:
    """This rank's rows of every tensor of ``batch`` whose dim 0 is the global batch ``n``, on ``device``."""
    if isinstance(batch, torch.Tensor):
        t = batch[rows] if batch.dim() and batch.shape[0] == n else batch
        return t.to(device)
    if isinstance(batch, dict):
        return {k: _local_batch(v, rows, n, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_local_batch(v, rows, n, device) for v in batch)
    return batch


def _rebind(groups: list[dict[str, Any]], run_model: nn.Module) -> list[dict[str, Any]]:
    """Point ``groups`` (built on the plain model, with ``names``) at the wrapped model's parameters:
    FSDP2 replaces every parameter by a sharded one and stores a complex one as (real, imag)."""
    params = dict(ddist.unwrap(run_model).named_parameters())
    conv = ddist.converted_params(run_model)
    out = []
    for g in groups:
        names = [s for n in g["names"] for s in (conv[n][1] if n in conv else [n])]
        out.append({**g, "params": [params[n] for n in names], "names": names})
    return out


def _is_legacy_optim(osd: Any) -> bool:
    """An index-keyed ``optimizer.state_dict()`` (checkpoints of deftly before name-keyed states)."""
    return isinstance(osd, dict) and any(not isinstance(p, str) for g in osd.get("param_groups", [])
                                         for p in g.get("params", []))


def _load_state(state: dict[str, Any], ckpt: Path, run_model: nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
    """Check the checkpoint's model and optimizer state against ``run_model``/``optimizer``, then load both
    (nothing changes when a check fails)."""
    src = str(ckpt)
    for key in ("model", "optimizer", "rng", "step", "train_time", "history", "losses"):
        if key not in state:
            raise ValueError(f"{src}: not a training checkpoint: key {key!r} is missing (found "
                             f"{sorted(state)}); start a new run directory or drop --resume")
    ddist.check_state_dict(run_model, state["model"], source=src)
    osd = state["optimizer"]
    if _is_legacy_optim(osd):
        raise ValueError(f"{src}: the optimizer state is index-keyed (written by a deftly before 0.1's name-keyed "
                         "checkpoints) and cannot be checked against this model; start a new run directory")
    ddist.check_optimizer_state(run_model, optimizer, osd, src)
    ddist.load_full_state_dict(run_model, state["model"], source=src)
    ddist.load_full_optimizer_state_dict(run_model, optimizer, osd, source=src)


def train(model: nn.Module, get_batch: Callable[[int], Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          config: TrainConfig, *, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
          checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
          optimizer: torch.optim.Optimizer | None = None,
          wrap_model: Callable[[nn.Module], nn.Module] = identity_wrap,
          exclude_from_mup: tuple[nn.Module, ...] = (),
          on_step: Callable[[int, float], None] | None = None, strategy: str = "none") -> TrainResult:
    """Train ``model`` for ``config.steps`` steps; see the module docstring.

    ``resume=True`` with an existing ``checkpoint_path`` continues that run exactly (same final weights as
    an uninterrupted run); with no checkpoint there it starts afresh. ``on_step(step, loss)`` is called
    after each step (tests use it to slow a run down). ``strategy``: ``"none"``, or ``"ddp"``/``"fsdp2"``
    in a ``torchrun`` launch whose process group is up (:func:`deftly.distributed.setup`); ``evaluate``
    then runs on every rank (an FSDP2 forward is collective) and only rank 0 prints and writes files.
    """
    cfg = config
    if strategy not in ddist.STRATEGIES:
        raise ValueError(f"train: strategy={strategy!r} is not one of {', '.join(map(repr, ddist.STRATEGIES))}")
    dinfo = ddist.info()
    if strategy == "none" and dinfo.distributed:
        raise ValueError(f"train: this process is rank {dinfo.rank} of {dinfo.world_size} (torchrun) but "
                         f"strategy='none' would train {dinfo.world_size} independent copies; use "
                         "strategy='ddp' or 'fsdp2'")
    if strategy != "none":
        if not dinfo.distributed:
            raise ValueError(f"train: strategy={strategy!r} needs a process group: launch with `torchrun "
                             "--nproc_per_node=N ...` and call deftly.distributed.setup() first")
        if optimizer is not None:
            raise ValueError(f"train: with strategy={strategy!r} the optimizer must be built after wrapping; "
                             "pass optimizer=None (AdamW over per-factor groups is built for you)")
    torch.manual_seed(cfg.seed)
    groups: list[dict[str, Any]] = []  # built when no optimizer is given (always, when distributed)
    if optimizer is None:
        groups = param_groups(model, cfg.lr, weight_decay=cfg.weight_decay, exclude=exclude_from_mup,
                              max_multiplier=cfg.max_lr_mult) \
            if cfg.mup else [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr,
                              "lr_mult": 1.0, "weight_decay": cfg.weight_decay,
                              "names": [n for n, p in model.named_parameters() if p.requires_grad]}]
    if strategy == "none":
        run_model = wrap_model(model)
    else:
        run_model = ddist.wrap_model(model, strategy)
        groups = _rebind(groups, run_model)
    if optimizer is None:
        for g in groups:
            g.pop("names", None)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    main = dinfo.is_main

    step, train_time = 0, 0.0
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    resumed_from = None
    if resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        saved_cfg = state.get("config", {})
        for key in ("steps", "lr", "seed", "warmup", "weight_decay", "mup"):
            if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
                raise ValueError(f"cannot resume from {ckpt}: it was written with {key}={saved_cfg[key]!r} but "
                                 f"this run has {key}={getattr(cfg, key)!r}; use the same settings or a new "
                                 "run directory")
        _load_state(state, ckpt, run_model, optimizer)
        set_rng_state(state["rng"])
        step, train_time = int(state["step"]), float(state["train_time"])
        history, losses = list(state["history"]), [float(x) for x in state["losses"]]
        resumed_from = step
        if cfg.progress and main:
            print(f"{cfg.label}: resumed from {ckpt} at step {step}/{cfg.steps}", file=sys.stderr)

    def save() -> None:
        if ckpt is None:
            return
        # collective under DDP/FSDP2 (full tensors on rank 0); no extra copy in one process:
        # save_checkpoint copies every tensor itself
        sd = ddist.full_state_dict(run_model, copy=False)
        osd = ddist.full_optimizer_state_dict(run_model, optimizer, copy=False)  # keyed by parameter name
        if main:
            save_checkpoint(ckpt, {"model": sd, "optimizer": osd, "rng": rng_state(), "step": step,
                                   "train_time": train_time, "history": history, "losses": losses,
                                   "config": asdict(cfg)})
        ddist.barrier()

    def run_eval() -> None:
        if evaluate is None:
            return
        was = model.training
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        model.train(was)
        history.append({"step": step, "train_time": train_time, **{k: float(v) for k, v in metrics.items()}})

    clock = time.perf_counter if cfg.clock == "wall" else time.process_time
    bar = Progress(cfg.steps, cfg.label, cfg.progress and main)
    bar.start_step = step
    model.train()
    stopped_early = False
    while step < cfg.steps:
        if cfg.max_time is not None and train_time >= cfg.max_time:
            stopped_early = True
            break
        t0 = clock()
        set_lr(optimizer, lr_at(step, cfg))
        batch = get_batch(step)
        if dinfo.distributed:
            n = _global_rows(batch)
            if n is None:
                raise ValueError(f"{cfg.label}: get_batch({step}) returned no tensor with a batch dimension; "
                                 "under DDP/FSDP2 each rank slices the global batch on dim 0")
            rows = ddist.local_slice(n, dinfo)
            batch = _local_batch(batch, rows, n, dinfo.device)
        loss = loss_fn(run_model, batch)
        lv = ddist.all_reduce_mean(loss.detach()) if dinfo.distributed else float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{cfg.label}: loss became {lv} at step {step}; lower lr "
                                     f"(now {cfg.lr}) or enable grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(run_model.parameters(), cfg.grad_clip)
        optimizer.step()
        train_time += clock() - t0
        step += 1
        losses.append(lv)
        extra = ""
        if history:
            last = history[-1]
            extra = " ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("step", "train_time"))
        bar.update(step, lv, extra)
        if on_step is not None:
            on_step(step, lv)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save()
    if not history or history[-1]["step"] != step:
        run_eval()
    bar.update(step, losses[-1] if losses else float("nan"), "stopped at max_time" if stopped_early else "",
               force=True)
    save()
    return TrainResult(step=step, train_time=train_time, final_loss=losses[-1] if losses else float("nan"),
                       history=history, losses=losses, resumed_from=resumed_from)
