"""Recipe: Fashion-MNIST classifiers whose hidden linear layers are dense or structured at a budget.

Models (``model=``):

* ``mlp``   — ``784 -> width`` (dense input layer), ``depth - 1`` hidden ``width -> width`` layers (the
  *hidden* layers, dense or structured), ``width -> 10`` dense readout; GELU between layers.
* ``mixer`` — a small MLP-Mixer: 4x4 patches (49 tokens) embedded to ``width`` channels, ``depth`` blocks
  of LayerNorm + token-mixing MLP (dense, 49 -> 98 -> 49) and LayerNorm + channel MLP
  (``width -> 2 width -> width``, the hidden layers), mean pooling, dense readout.

Every structure gets the hyperparameters whose exact ``param_count`` comes closest to
``fraction * in * out`` without exceeding it (:func:`deftly.surgery.budget.choose_hparams`, the solver ``structurize`` uses). All models train
the same number of epochs with AdamW and structure-aware per-factor learning rates
(:func:`deftly.train.mup.param_groups`), so the comparison is at equal epochs.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed as ddist
from ..data import fashion_mnist
from ..surgery.budget import BudgetError
from .common import (
    available,
    budget_linear,
    check_counts,
    check_structures,
    forward_flops,
    linear_stats,
    seed_everything,
)
from .loop import TrainConfig, epoch_batches, train
from .results import curves_plot, pareto_plot, write_json, write_run

__all__ = ["COLUMNS", "MLP", "FashionConfig", "Mixer", "accuracy", "run"]

DEFAULT_STRUCTURES = ("dense", "monarch", "lrbd", "lowrank", "blockdiag", "butterfly", "btt", "kronecker",
                      "blocktridiag", "banded")


@dataclass
class FashionConfig:
    structures: tuple[str, ...] = ("dense", "monarch", "lrbd", "lowrank", "blockdiag", "butterfly")
    fraction: float = 0.1
    model: str = "mlp"
    width: int = 1024
    depth: int = 3
    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    mup: bool = True
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        self.structures = check_structures(self.structures)
        if self.model not in ("mlp", "mixer"):
            raise ValueError(f"model={self.model!r} is not a Fashion-MNIST model; use 'mlp' or 'mixer'")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1], e.g. 0.1 for 10% of the hidden "
                             "layers' parameters")
        check_counts("FashionConfig", ("train_limit", "test_limit", "threads"), epochs=self.epochs, width=self.width,
                     depth=self.depth, batch_size=self.batch_size, train_limit=self.train_limit,
                     test_limit=self.test_limit, threads=self.threads)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"FashionConfig: lr={self.lr!r} must be a positive number, e.g. 1e-3")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < float("inf")):
            raise ValueError(f"FashionConfig: weight_decay={self.weight_decay!r} must be a number >= 0")


class MLP(nn.Module):
    def __init__(self, structure: str, fraction: float, width: int = 1024, depth: int = 3,
                 n_in: int = 784, n_out: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.hidden = nn.ModuleList(budget_linear(structure, width, width, fraction) for _ in range(depth - 1))
        self.out = nn.Linear(width, n_out)

    def hidden_layers(self) -> list[nn.Module]:
        return list(self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x.flatten(1)))
        for layer in self.hidden:
            h = F.gelu(layer(h))
        return self.out(h)


class MixerBlock(nn.Module):
    def __init__(self, structure: str, fraction: float, tokens: int, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.tok1 = nn.Linear(tokens, 2 * tokens)
        self.tok2 = nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(width)
        self.ch1 = budget_linear(structure, width, 2 * width, fraction)
        self.ch2 = budget_linear(structure, 2 * width, width, fraction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, tokens, width)
        y = self.norm1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.norm2(x))))


class Mixer(nn.Module):
    def __init__(self, structure: str, fraction: float, width: int = 128, depth: int = 4, patch: int = 4,
                 n_out: int = 10) -> None:
        super().__init__()
        self.patch = patch
        tokens = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.blocks = nn.ModuleList(MixerBlock(structure, fraction, tokens, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, n_out)

    def hidden_layers(self) -> list[nn.Module]:
        blocks = cast("list[MixerBlock]", list(self.blocks))  # nn.ModuleList is typed as holding nn.Module
        return [m for b in blocks for m in (b.ch1, b.ch2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        img = x.reshape(-1, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, p * p)
        h = self.embed(img)
        for b in self.blocks:
            h = b(h)
        return self.out(self.norm(h).mean(1))


def build(cfg: FashionConfig, structure: str) -> MLP | Mixer:
    if cfg.model == "mlp":
        return MLP(structure, cfg.fraction, cfg.width, cfg.depth)
    return Mixer(structure, cfg.fraction, cfg.width, cfg.depth)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Fraction of ``x`` whose argmax logit equals ``y`` (model in eval mode, batched)."""
    if len(x) != len(y):
        raise ValueError(f"accuracy: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("accuracy: empty data")
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / len(x)


COLUMNS = [("structure", "structure"), ("hparams", "hyperparameters"), ("hidden_params", "hidden params"),
           ("hidden_fraction", "of dense"), ("params", "total params"), ("flops", "FLOPs/example"),
           ("train_time", "train s"), ("test_acc", "test acc %"), ("gap", "gap to dense (points)")]


def _one(cfg: FashionConfig, structure: str, data, out: Path, resume: bool, progress: bool,
         strategy: str = "none") -> dict[str, Any]:
    sub = out / structure
    done = sub / "row.json"
    key = {**asdict(cfg), "structures": None, "threads": None}
    if resume and done.exists():
        saved = json.loads(done.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["row"]
    seed_everything(cfg.seed)
    model = build(cfg, structure)
    stats = linear_stats(model, model.hidden_layers())
    x, y, xt, yt = data
    stats["flops"] = forward_flops(model, x[:1])  # per example, every linear layer, every token
    idx = epoch_batches(len(x), cfg.batch_size, cfg.seed)
    # epoch_batches sets steps_per_epoch on the function it returns (typed as a plain Callable)
    per_epoch: int = idx.steps_per_epoch  # type: ignore[attr-defined]
    steps = cfg.epochs * per_epoch

    def get_batch(step: int):
        i = idx(step)
        return x[i], y[i]

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    tcfg = TrainConfig(steps=steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=max(1, steps // 50),
                       min_lr_ratio=0.0, mup=cfg.mup, eval_every=per_epoch,
                       checkpoint_every=max(1, per_epoch // 2), seed=cfg.seed,
                       progress=progress, label=f"fashion-mnist {cfg.model} {structure}",
                       # measured: this 2-epoch MLP trains better with the multipliers uncapped (butterfly
                       # 86.74% capped at 2 vs 87.54% uncapped, lowrank 87.27 vs 87.44; docs/defaults.md)
                       max_lr_mult=None)
    res = train(model, get_batch, loss_fn, tcfg, evaluate=lambda m: {"test_acc": accuracy(m, xt, yt)},
                checkpoint_path=sub / "checkpoint.safetensors", resume=resume, strategy=strategy,
                exclude_from_mup=(model.inp, model.out) if isinstance(model, MLP) else (model.embed, model.out))
    row = {"structure": structure, **stats, "train_time": res.train_time,
           "test_acc": 100.0 * res.history[-1]["test_acc"], "final_train_loss": res.final_loss,
           "epochs": cfg.epochs, "steps": res.step,
           "curve": [(h["step"] / per_epoch, 100.0 * h["test_acc"]) for h in res.history]}
    if ddist.is_main():
        write_json(done, {"key": key, "row": row})
    return row


def _say(msg: str) -> None:
    """A progress line on stderr (where the progress bars go)."""
    print(msg, file=sys.stderr, flush=True)


def run(cfg: FashionConfig, out_dir: str | Path = "runs/fashion-mnist", resume: bool = False,
        progress: bool = True, command: str | None = None, strategy: str = "none") -> dict[str, Any]:
    """Train every structure of ``cfg`` and write the run directory; returns the results dict.

    ``strategy="ddp"|"fsdp2"``: call it in every process of a ``torchrun`` launch (process group up);
    each rank trains on its slice of every batch, rank 0 writes the run directory."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    names, notes = available(cfg.structures)
    say = _say if progress and ddist.is_main() else (lambda msg: None)
    x, y = fashion_mnist.tensors("train", cfg.train_limit)
    xt, yt = fashion_mnist.tensors("test", cfg.test_limit)
    say(f"Fashion-MNIST: {len(x):,} training and {len(xt):,} test images; {len(names)} model(s) to train")
    data = (x, y, xt, yt)
    rows = []
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        say(f"[{i + 1}/{len(names)}] {name}")
        try:
            rows.append(_one(cfg, name, data, out, resume, progress, strategy))
        except BudgetError as err:
            notes.append(f"{name}: skipped — {err}")
    if not rows:
        raise ValueError("nothing was trained: " + "; ".join(notes) + f" (fraction={cfg.fraction}; raise it or "
                         "choose other structures)")
    dense = next((r for r in rows if r["structure"] == "dense"), None)
    for r in rows:
        r["gap"] = (r["test_acc"] - dense["test_acc"]) if dense else None
    structured = [r for r in rows if r["structure"] != "dense"]
    best = max(structured, key=lambda r: r["test_acc"], default=None)
    notes.insert(0, f"{cfg.model.upper()} width {cfg.width}, depth {cfg.depth}; hidden layers at "
                    f"<= {cfg.fraction:.0%} of their dense parameters; {cfg.epochs} epochs of "
                    f"{len(x)} images, batch {cfg.batch_size}, AdamW lr {cfg.lr}"
                    f"{' with structure-aware per-factor LRs' if cfg.mup else ''}; test set {len(xt)} images.")
    if best and dense:
        notes.append(f"best structure: {best['structure']} at {best['hidden_fraction']:.1%} of the hidden "
                     f"parameters, {best['test_acc']:.2f}% vs dense {dense['test_acc']:.2f}% "
                     f"(gap {best['gap']:+.2f} points).")
    if not ddist.is_main():  # rank 0 writes the run directory
        return {"rows": rows, "notes": notes, "out_dir": str(out), "best": best, "dense": dense}
    plots = []
    if rows:
        plots.append(pareto_plot([{**r, "x": r["hidden_params"]} for r in rows], "x", "test_acc",
                                 out / "pareto.png", title=f"Fashion-MNIST {cfg.model}: accuracy vs parameters",
                                 xlabel="hidden-layer parameters (log scale)", ylabel="test accuracy (%)"))
        plots.append(curves_plot({r["structure"]: ([c[0] for c in r["curve"]], [c[1] for c in r["curve"]])
                                  for r in rows}, out / "curves.png", title="test accuracy per epoch",
                                 xlabel="epoch", ylabel="test accuracy (%)"))
    config = {**asdict(cfg), "structures": list(cfg.structures), "train_size": len(x), "test_size": len(xt),
              "wall_time": time.perf_counter() - t0, "strategy": strategy,
              "world_size": ddist.info().world_size}
    table_rows = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    write_run(out, recipe=f"fashion-mnist-{cfg.model}", config=config, rows=table_rows, columns=COLUMNS,
              notes=notes, plots=plots, command=command, extra={"curves": {r["structure"]: r["curve"]
                                                                           for r in rows}})
    return {"rows": rows, "notes": notes, "out_dir": str(out), "best": best, "dense": dense}
