"""Recipe: compress the real all-MiniLM-L6-v2's encoder linear layers to a budget and heal them by
distillation from the dense teacher.

1. Teacher: the pretrained model (mean-pooled, L2-normalised sentence embeddings).
2. Surgery: every encoder linear layer (query/key/value, attention output, FFN in/out; 36 layers,
   10.6M weights) becomes ``structure`` at ``budget`` of its dense parameters, initialised by projecting
   the pretrained weight with :func:`deftly.structurize` — activation-aware, calibrated on Wikipedia
   sentences — so the student starts as close to the teacher as the structure allows.
3. Healing: the student is trained to reproduce the teacher's token states (MSE) and sentence embeddings
   (1 - cosine) on Wikipedia sentences, for at most ``minutes`` of CPU time, through the resumable
   training loop (AdamW, structure-aware per-factor learning rates). Options: layer-wise matching of every
   intermediate layer's token states (``hidden_weight``), the weight of the sentence-cosine term
   (``cosine_weight``), batches of sentences of similar length (``group_by_length``: less padding, more
   steps per CPU minute), and separate budgets for the attention and FFN linears.
4. Metrics, before and after healing: mean cosine between student and teacher embeddings on held-out
   Wikipedia sentences, and the test accuracy of a logistic-regression sentiment probe (L2, C=1) fitted on
   the embeddings of the rotten-tomatoes snippets (fixed 70/30 split).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import minilm as minilm_data
from ..data import reviews, wikipedia
from .common import median_step_time, seed_everything
from .loop import TrainConfig, train
from .results import pareto_plot, write_json, write_run

__all__ = ["ATTENTION_LINEARS", "COLUMNS", "ENCODER_LINEARS", "FFN_LINEARS", "MiniLMConfig", "budget_overrides",
           "distillation_loss", "embedding_cosine", "logistic_probe", "run"]

ENCODER_LINEARS = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                   r"intermediate\.dense|output\.dense)")
ATTENTION_LINEARS = r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
FFN_LINEARS = r"encoder\.layer\.\d+\.(intermediate\.dense|output\.dense)"


def budget_overrides(cfg: MiniLMConfig) -> dict[str, dict[str, float]]:
    """``StructureConfig.overrides`` giving the attention and FFN linears their own budgets."""
    out: dict[str, dict[str, float]] = {}
    if cfg.attention_budget is not None:
        out[ATTENTION_LINEARS] = {"budget": cfg.attention_budget}
    if cfg.ffn_budget is not None:
        out[FFN_LINEARS] = {"budget": cfg.ffn_budget}
    return out


def distillation_loss(teacher: nn.Module, cosine_weight: float = 10.0, hidden_weight: float = 0.0):
    """``loss_fn(student, batch)``: normalised token-state MSE of the last layer + ``cosine_weight`` x
    (1 - cosine of the mean-pooled sentence embeddings) + ``hidden_weight`` x the mean normalised
    token-state MSE of the intermediate layers (layer-wise matching; the embedding layer is excluded)."""

    def mse(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return ((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]) / t.pow(2).mean().detach()

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        layers = hidden_weight > 0
        with torch.no_grad():
            to = teacher(**batch, output_hidden_states=layers)
        so = model(**batch, output_hidden_states=layers)
        th, sh = to.last_hidden_state, so.last_hidden_state
        m = mask.unsqueeze(-1).to(sh.dtype)
        se = F.normalize(minilm_data.mean_pool(sh, mask), dim=-1)
        te = F.normalize(minilm_data.mean_pool(th, mask), dim=-1)
        loss = mse(sh, th, m) + (1.0 - (se * te).sum(-1)).mean() * cosine_weight
        if layers:
            mids = list(zip(so.hidden_states[1:-1], to.hidden_states[1:-1]))
            if mids:
                loss = loss + hidden_weight * sum(mse(s, t, m) for s, t in mids) / len(mids)
        return loss

    return loss_fn


@dataclass
class MiniLMConfig:
    structure: str = "lowrank"
    budget: float = 0.25
    minutes: float = 20.0  # distillation time limit (training steps only)
    batch_size: int = 32
    max_length: int = 64
    lr: float = 2e-4
    warmup: int = 20
    eval_sentences: int = 500
    calibration_sentences: int = 256
    probe_limit: int | None = None  # use the first N snippets of each split (tests)
    train_sentences: int | None = None
    max_steps: int | None = None  # cap on distillation steps (tests); default from minutes
    seed: int = 0
    threads: int | None = None
    mup: bool = True
    clock: str = "wall"  # "process": the time limit counts this process's CPU time
    # distillation objective: normalised token-state MSE of the last layer
    #   + cosine_weight * (1 - cosine of the sentence embeddings)
    #   + hidden_weight * mean over the intermediate layers of their normalised token-state MSE
    cosine_weight: float = 10.0
    hidden_weight: float = 0.0
    group_by_length: bool = False  # batches of sentences of similar token length (less padding, more steps)
    min_lr_ratio: float = 0.1  # the cosine schedule decays the lr to lr * min_lr_ratio
    # budget per layer kind, as a fraction of that kind's dense parameters (None: ``budget``); the overall
    # fraction is reported in the rows
    attention_budget: float | None = None  # query, key, value, attention output
    ffn_budget: float | None = None  # intermediate (FFN in) and output (FFN out)

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "process"):
            raise ValueError(f"clock={self.clock!r} must be 'wall' or 'process'")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget} must be in (0, 1], e.g. 0.25")
        if self.minutes <= 0:
            raise ValueError(f"minutes={self.minutes} must be > 0")
        for name in ("attention_budget", "ffn_budget"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"{name}={v} must be in (0, 1], e.g. 0.2")
        if self.cosine_weight < 0 or self.hidden_weight < 0:
            raise ValueError("cosine_weight and hidden_weight must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def logistic_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   C: float = 1.0, max_iter: int = 200) -> float:
    """Test accuracy of L2-regularised logistic regression (binary or multinomial) fitted by L-BFGS on
    ``sum(log loss) + ||W||^2 / (2 C)`` (intercept unpenalised), as scikit-learn's default."""
    x = x_train.to(torch.float64)
    y = torch.as_tensor(y_train, dtype=torch.long)
    classes = int(max(int(y.max()), int(torch.as_tensor(y_test).max())) + 1)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, reduction="sum") + (w * w).sum() / (2.0 * C)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (x_test.to(torch.float64) @ w + b).argmax(-1)
    return float((pred == torch.as_tensor(y_test)).double().mean())


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(F.cosine_similarity(a, b, dim=-1).mean())


class _Probe:
    def __init__(self, tok, limit: int | None) -> None:
        (tr_x, tr_y), (te_x, te_y) = reviews.split()
        if limit is not None:
            tr_x, tr_y, te_x, te_y = tr_x[:limit], tr_y[:limit], te_x[:limit], te_y[:limit]
        self.tok = tok
        self.data = (tr_x, torch.from_numpy(tr_y), te_x, torch.from_numpy(te_y))

    def __call__(self, model: nn.Module) -> float:
        tr_x, tr_y, te_x, te_y = self.data
        etr = minilm_data.embed(model, self.tok, tr_x)
        ete = minilm_data.embed(model, self.tok, te_x)
        return logistic_probe(etr, tr_y, ete, te_y)


def _encoder_linear_params(model: nn.Module) -> int:
    import re

    total = 0
    for name, m in model.named_modules():
        if re.fullmatch(ENCODER_LINEARS, name):
            total += sum(p.numel() for n, p in m.named_parameters() if n.split(".")[-1] != "bias")
    return total


COLUMNS = [("stage", "model"), ("structure", "structure"), ("linear_params", "encoder linear weights"),
           ("linear_fraction", "of dense"), ("params", "total params"), ("cosine", "cosine to teacher (held-out)"),
           ("probe_acc", "probe acc"), ("probe_rel", "probe vs dense"), ("minutes", "distillation min")]


def run(cfg: MiniLMConfig, out_dir: str | Path = "runs/minilm", resume: bool = False, progress: bool = True,
        command: str | None = None) -> dict[str, Any]:
    from deftly.io.persist import load as load_structured
    from deftly.io.persist import save as save_structured
    from deftly.surgery.structurize import StructureConfig, structurize

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    tok, teacher = minilm_data.load()
    for p in teacher.parameters():
        p.requires_grad_(False)

    sents = wikipedia.sentences()
    order = np.random.RandomState(cfg.seed).permutation(len(sents))
    eval_s = [sents[i] for i in order[:cfg.eval_sentences]]
    cal_s = [sents[i] for i in order[cfg.eval_sentences:cfg.eval_sentences + cfg.calibration_sentences]]
    train_s = [sents[i] for i in order[cfg.eval_sentences:]]
    if cfg.train_sentences is not None:
        train_s = train_s[:cfg.train_sentences]
    probe = _Probe(tok, cfg.probe_limit)
    teacher_eval = minilm_data.embed(teacher, tok, eval_s, max_length=cfg.max_length)

    def stage_row(stage: str, model: nn.Module, structure: str, minutes: float | None) -> dict[str, Any]:
        emb = minilm_data.embed(model, tok, eval_s, max_length=cfg.max_length)
        lin = _encoder_linear_params(model)
        return {"stage": stage, "structure": structure, "linear_params": lin,
                "params": sum(p.numel() for p in model.parameters()), "cosine": embedding_cosine(emb, teacher_eval),
                "probe_acc": probe(model), "minutes": minutes}

    # finished stages are reused by --resume while the settings they depend on are unchanged
    rows_file = out / "rows.json"
    cached = json.loads(rows_file.read_text()) if (resume and rows_file.exists()) else {}
    eval_key = {k: getattr(cfg, k) for k in ("eval_sentences", "probe_limit", "max_length", "seed")}
    proj_key = {**eval_key, **{k: getattr(cfg, k) for k in ("structure", "budget", "calibration_sentences")}}
    if cfg.attention_budget is not None or cfg.ffn_budget is not None:  # old keys stay valid
        proj_key.update(attention_budget=cfg.attention_budget, ffn_budget=cfg.ffn_budget)
    if cached.get("eval_key") != eval_key:
        cached = {"eval_key": eval_key}
    if cached.get("proj_key") != proj_key:
        cached.pop("projected", None)
        cached.pop("surgery", None)
        cached["proj_key"] = proj_key

    if "teacher" not in cached:
        cached["teacher"] = stage_row("dense teacher", teacher, "dense", None)
        write_json(rows_file, cached)
    dense_row = cached["teacher"]
    dense_lin = dense_row["linear_params"]

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)

    def calibrate(model: nn.Module) -> None:
        for i in range(0, len(cal_s), 64):
            enc = tok(cal_s[i:i + 64], padding=True, truncation=True, max_length=cfg.max_length,
                      return_tensors="pt")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    # the projected student is saved next to rows.json; --resume reuses it instead of redoing the surgery
    projected_dir = out / "projected"
    surgery = cached.get("surgery") if "projected" in cached else None
    if surgery is not None and projected_dir.is_dir():
        load_structured(student, projected_dir)
        if progress:
            print(f"minilm: reusing the projected student in {projected_dir}", flush=True)
    else:
        t0 = time.perf_counter()
        report = structurize(student, StructureConfig(structure=cfg.structure, target_modules=ENCODER_LINEARS,
                                                      budget=cfg.budget, overrides=budget_overrides(cfg),
                                                      calibration=calibrate, seed=cfg.seed))
        surgery = {"layers": len(report), "seconds": time.perf_counter() - t0,
                   "report": report.to_dict() if hasattr(report, "to_dict") else str(report)}
        if progress:
            print(f"minilm: structurized {surgery['layers']} encoder linear layers to {cfg.structure} in "
                  f"{surgery['seconds']:.1f} s", flush=True)
        cached["projected"] = stage_row(f"{cfg.structure} projected", student, cfg.structure, 0.0)
        cached["surgery"] = surgery
        save_structured(student, projected_dir)
        write_json(rows_file, cached)
    surgery_s = surgery["seconds"]

    # ---------------------------------------------------------------- healing by distillation
    if cfg.group_by_length:  # training sentences sorted by token length; a batch is a random run of neighbours
        lengths = [len(ids) for ids in tok(train_s, truncation=True, max_length=cfg.max_length)["input_ids"]]
        by_length = np.argsort(np.asarray(lengths), kind="stable")

    def batch_of(step: int) -> dict[str, torch.Tensor]:
        g = np.random.RandomState((cfg.seed * 7919 + step) % (2**32))
        if cfg.group_by_length:
            start = g.randint(0, max(len(train_s) - cfg.batch_size, 0) + 1)
            idx = by_length[start:start + cfg.batch_size]
        else:
            idx = g.randint(0, len(train_s), size=cfg.batch_size)
        enc = tok([train_s[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    loss_fn = distillation_loss(teacher, cfg.cosine_weight, cfg.hidden_weight)

    if cfg.max_steps is not None:
        steps = cfg.max_steps
    else:
        opt = torch.optim.AdamW([p for p in student.parameters()], lr=0.0)
        if cfg.group_by_length:  # batch lengths vary: mean time over 8 batches
            probe_batches = [batch_of(i) for i in range(8)]
            now = time.perf_counter if cfg.clock == "wall" else time.process_time
            opt.zero_grad(set_to_none=True)
            loss_fn(student, probe_batches[0]).backward()  # warm-up
            t0 = now()
            for b in probe_batches:
                opt.zero_grad(set_to_none=True)
                loss_fn(student, b).backward()
            st = (now() - t0) / len(probe_batches)
        else:
            probe_batch = batch_of(0)

            def one() -> None:
                opt.zero_grad(set_to_none=True)
                loss_fn(student, probe_batch).backward()

            st = median_step_time(one, repeats=3, warmup=1, clock=cfg.clock)
        student.zero_grad(set_to_none=True)
        steps = max(10, int(cfg.minutes * 60 / (st * 1.15)))
        del opt
    tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, max(steps // 10, 1)),
                       min_lr_ratio=cfg.min_lr_ratio,
                       mup=cfg.mup, eval_every=0, checkpoint_every=max(steps // 20, 1), seed=cfg.seed,
                       max_time=cfg.minutes * 60, progress=progress, label=f"minilm distil {cfg.structure}",
                       grad_clip=1.0, clock=cfg.clock)
    emb_modules = (student.embeddings,) if hasattr(student, "embeddings") else ()
    res = train(student, batch_of, loss_fn, tcfg, checkpoint_path=out / "student.safetensors", resume=resume,
                exclude_from_mup=tuple(m for m in emb_modules))
    healed = stage_row(f"{cfg.structure} healed", student, cfg.structure, res.train_time / 60.0)
    healed["clock"] = cfg.clock
    healed["steps"] = res.step
    rows = [dense_row, cached["projected"], healed]
    for r in rows:
        r["linear_fraction"] = r["linear_params"] / dense_lin
        r["probe_rel"] = r["probe_acc"] / dense_row["probe_acc"]
    kinds = "".join(f", {k} linears at <= {v:.1%}" for k, v in (("attention", cfg.attention_budget),
                                                                 ("FFN", cfg.ffn_budget)) if v is not None)
    loss_text = (f"token-state MSE (normalised) + {cfg.cosine_weight:g} x (1 - cosine of sentence embeddings)"
                 + (f" + {cfg.hidden_weight:g} x mean normalised MSE of the intermediate layers' token states"
                    if cfg.hidden_weight > 0 else ""))
    notes = [(f"all-MiniLM-L6-v2 (real weights); {surgery['layers']} encoder linear layers -> {cfg.structure} at "
              f"<= {cfg.budget:.0%} of their dense parameters{kinds}, projected with activation-aware calibration "
              f"({len(cal_s)} sentences), surgery {surgery_s:.1f} s."),
             (f"healing: {res.step} distillation steps ({res.train_time / 60:.1f} min of training), batch "
             f"{cfg.batch_size} Wikipedia sentences (<= {cfg.max_length} tokens"
              + (", grouped by length" if cfg.group_by_length else "") + f") from {len(train_s):,}; loss = "
             f"{loss_text}; AdamW lr {cfg.lr}, cosine schedule to {cfg.min_lr_ratio:g} x lr; time limit "
             f"{cfg.minutes} min of "
             + ("wall-clock time." if cfg.clock == "wall" else "CPU time of this process (time.process_time).")),
             (f"cosine: mean over {len(eval_s)} held-out Wikipedia sentences; probe: logistic regression "
              f"(C=1) on embeddings of {len(probe.data[0])} / {len(probe.data[2])} rotten-tomatoes snippets "
              "(fixed 70/30 split, seed 0).")]
    plots = [pareto_plot([{**r, "x": r["linear_params"], "y": 100 * r["probe_acc"], "structure": r["stage"]}
                          for r in rows], "x", "y", out / "pareto.png",
                         title="MiniLM: sentiment probe vs encoder linear parameters",
                         xlabel="encoder linear weights (log scale)", ylabel="probe accuracy (%)")]
    config = {**asdict(cfg), "wall_time": time.perf_counter() - t_start, "train_sentences_n": len(train_s),
              "surgery": surgery["report"]}
    write_run(out, recipe="compress-minilm", config=config, rows=rows, columns=COLUMNS, notes=notes, plots=plots,
              command=command, extra={"losses": res.losses[:: max(1, len(res.losses) // 200)]})
    return {"rows": rows, "notes": notes, "out_dir": str(out)}
