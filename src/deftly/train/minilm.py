"""Recipe: compress the real all-MiniLM-L6-v2's encoder linear layers to a budget and heal them by
distillation from the dense teacher.

1. Teacher: the pretrained model (mean-pooled, L2-normalised sentence embeddings).
2. Surgery: the encoder linear layers (query/key/value, attention output, FFN in/out; 36 layers, 10.6M
   weights) together keep ``budget`` of their dense weights. ``allocation="sensitivity"`` (default) gives
   each layer its share by sensitivity (:func:`deftly.surgery.sensitivity.allocate_budgets`: the change of
   the sentence embeddings when that layer alone is projected, per unit of its output error; a layer
   whose share reaches its dense size stays dense); ``"uniform"`` gives every layer ``budget``. Each
   layer is initialised by an activation-aware projection (truncation-aware whitening) calibrated on
   unpadded Wikipedia sentences: ``projection="sequential"`` (default,
   :func:`deftly.surgery.sequential.structurize_sequential`) fits each layer, in model order, to the
   teacher's output of that layer from the inputs it receives in the partly compressed student, so each
   layer corrects part of the error before it; ``"independent"`` projects each on the teacher's inputs
   (:func:`deftly.structurize`).
3. Healing: the student is trained to reproduce the teacher's token states (MSE, last layer and, with
   ``hidden_weight``, every intermediate layer) and sentence embeddings (1 - cosine) for at most
   ``minutes`` of CPU time, through the resumable training loop (AdamW, structure-aware per-factor
   learning rates), on batches of sentences of similar token length (``group_by_length``: less padding,
   more steps per CPU minute) from Wikipedia and, with ``review_fraction``, from movie-review snippets
   that are not among the probe's. The teacher runs in bfloat16 (``teacher_bf16``; its embeddings agree
   with float32 to a cosine of 0.99999) and the word embeddings, which are not compressed, stay frozen
   (``train_word_embeddings``): both buy steps per CPU minute. The healed student is written with
   :func:`deftly.save` to ``OUT/student`` (``deftly.load`` reads it into a freshly loaded MiniLM).
4. Metrics, before and after healing: mean cosine between student and teacher embeddings on held-out
   Wikipedia sentences, and the test accuracy of a logistic-regression sentiment probe (L2, C=1) fitted on
   the embeddings of the rotten-tomatoes snippets (fixed 70/30 split).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from typing import cast as as_type

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
           "distillation_loss", "embedding_cosine", "logistic_probe", "review_texts", "run", "unpadded_batches"]

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


def distillation_loss(teacher: nn.Module, cosine_weight: float = 10.0, hidden_weight: float = 0.0,
                      teacher_bf16: bool = False):
    """``loss_fn(student, batch)``: normalised token-state MSE of the last layer + ``cosine_weight`` x
    (1 - cosine of the mean-pooled sentence embeddings) + ``hidden_weight`` x the mean normalised
    token-state MSE of the intermediate layers (layer-wise matching; the embedding layer is excluded).
    ``teacher_bf16``: the teacher's forward runs under bfloat16 autocast (its outputs are used in float32)."""

    def mse(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return ((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]) / t.pow(2).mean().detach()

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        layers = hidden_weight > 0
        cast = (torch.autocast(mask.device.type, dtype=torch.bfloat16) if teacher_bf16
                else contextlib.nullcontext())
        with torch.no_grad(), cast:
            to = teacher(**batch, output_hidden_states=layers)
        so = model(**batch, output_hidden_states=layers)
        th, sh = to.last_hidden_state.float(), so.last_hidden_state
        m = mask.unsqueeze(-1).to(sh.dtype)
        se = F.normalize(minilm_data.mean_pool(sh, mask), dim=-1)
        te = F.normalize(minilm_data.mean_pool(th, mask), dim=-1)
        loss = mse(sh, th, m) + (1.0 - (se * te).sum(-1)).mean() * cosine_weight
        if layers:
            mids = [(h, t.float()) for h, t in zip(so.hidden_states[1:-1], to.hidden_states[1:-1])]
            if mids:
                loss = loss + hidden_weight * sum(mse(s, t, m) for s, t in mids) / len(mids)
        return loss

    return loss_fn


@dataclass
class MiniLMConfig:
    structure: str = "lowrank"
    budget: float = 0.25  # fraction of the encoder linear weights kept (in total)
    minutes: float = 20.0  # distillation time limit (training steps only)
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    warmup: int = 20
    eval_sentences: int = 500
    calibration_sentences: int = 1024
    # "sensitivity": per-layer budgets by sensitivity (same total); "uniform": every layer at ``budget``
    allocation: str = "sensitivity"
    sensitivity_sentences: int = 256  # the first N calibration sentences measure the sensitivities
    # "sequential": each layer, in model order, is fitted to the teacher's layer output from the inputs it gets
    # in the student (deftly.surgery.sequential); "independent": each on its own inputs in the teacher
    projection: str = "sequential"
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
    hidden_weight: float = 1.0
    group_by_length: bool = True  # batches of sentences of similar token length (less padding, more steps)
    min_lr_ratio: float = 0.1  # the cosine schedule decays the lr to lr * min_lr_ratio
    # budget per layer kind, as a fraction of that kind's dense parameters (None: ``budget``); the overall
    # fraction is reported in the rows
    attention_budget: float | None = None  # query, key, value, attention output
    ffn_budget: float | None = None  # intermediate (FFN in) and output (FFN out)
    review_fraction: float = 0.0  # share of batches drawn from review snippets that are not the probe's
    teacher_bf16: bool = True  # the teacher's forward under bfloat16 autocast (faster targets)
    train_word_embeddings: bool = False  # the (uncompressed) word embeddings are trained too
    dropout: bool = False  # keep the model's dropout (p=0.1) in the student while distilling

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
        if self.allocation not in ("sensitivity", "uniform"):
            raise ValueError(f"allocation={self.allocation!r} must be 'sensitivity' (per-layer budgets by "
                             f"sensitivity) or 'uniform' (every layer at the budget)")
        if self.projection not in ("sequential", "independent"):
            raise ValueError(f"projection={self.projection!r} must be 'sequential' (each layer corrects the "
                             f"errors before it) or 'independent' (each layer on the teacher's inputs)")
        if not 0 <= self.review_fraction <= 1:
            raise ValueError(f"review_fraction={self.review_fraction} must be in [0, 1], e.g. 0.5")
        for name in ("calibration_sentences", "sensitivity_sentences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a whole number >= 1")


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

    def _embed(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Embeddings in the texts' order, computed in order of length (batches with little padding)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        emb = minilm_data.embed(model, self.tok, [texts[i] for i in order])
        out = torch.empty_like(emb)
        out[torch.tensor(order, dtype=torch.long)] = emb
        return out

    def __call__(self, model: nn.Module) -> float:
        tr_x, tr_y, te_x, te_y = self.data
        return logistic_probe(self._embed(model, tr_x), tr_y, self._embed(model, te_x), te_y)


def unpadded_batches(tok, texts: list[str], max_length: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """The texts tokenised and grouped by exact token length into batches without padding (so calibration
    statistics see real tokens only), in order of length."""
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for ids in tok(list(texts), truncation=True, max_length=max_length)["input_ids"]:
        by_length[len(ids)].append(ids)
    out = []
    for n in sorted(by_length):
        rows = by_length[n]
        for i in range(0, len(rows), batch_size):
            ids = torch.tensor(rows[i:i + batch_size], dtype=torch.long)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def review_texts(exclude: set[str]) -> list[str]:
    """Movie-review snippets of the 12,808-row rotten-tomatoes file that are not in ``exclude`` (the probe's
    train and test snippets), for distillation: the probe's domain without its texts."""
    texts, _ = reviews.load(full=True)
    seen: set[str] = set()
    out = []
    for t in texts:
        if t not in exclude and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _encoder_linear_params(model: nn.Module) -> int:
    total = 0
    for name, m in model.named_modules():
        if re.fullmatch(ENCODER_LINEARS, name):
            total += sum(p.numel() for n, p in m.named_parameters() if n.split(".")[-1] != "bias")
    return total


COLUMNS = [("stage", "model"), ("structure", "structure"), ("linear_params", "encoder linear weights"),
           ("linear_fraction", "of dense"), ("params", "total params"), ("cosine", "cosine to teacher (held-out)"),
           ("probe_acc", "probe acc"), ("probe_rel", "probe vs dense"), ("minutes", "distillation min")]


def _surgery(student: nn.Module, teacher: nn.Module, cfg: MiniLMConfig, tok, cal_s: list[str], say
             ) -> dict[str, Any]:
    """Structurize the encoder linears (per-layer budgets by sensitivity or uniform; sequential or
    independent projection), printing one line per layer; returns the JSON-able surgery record."""
    from deftly.surgery.sensitivity import allocate_budgets
    from deftly.surgery.sequential import structurize_sequential
    from deftly.surgery.structurize import StructureConfig, structurize

    t0 = time.perf_counter()
    batches = unpadded_batches(tok, cal_s, cfg.max_length)

    def calibrate(model: nn.Module) -> None:
        for b in batches:
            model(**b)

    scfg = StructureConfig(structure=cfg.structure, target_modules=ENCODER_LINEARS, budget=cfg.budget,
                           overrides=budget_overrides(cfg), calibration=calibrate, seed=cfg.seed)
    record: dict[str, Any] = {"allocation": cfg.allocation, "projection": cfg.projection}
    if cfg.allocation == "sensitivity":
        measure_s = cal_s[:cfg.sensitivity_sentences]
        say(f"minilm: per-layer budgets by sensitivity ({len(measure_s)} sentences measure each layer)")
        alloc = allocate_budgets(student, scfg, measure=lambda m: minilm_data.embed(
            m, tok, measure_s, max_length=cfg.max_length), progress=lambda line: say(f"minilm: {line}"))
        record["budgets"] = {la.name: {"hparams": la.hparams, "fraction": la.params / la.dense_params,
                                       "sensitivity": la.sensitivity} for la in alloc.layers}
        record["allocation_table"] = alloc.to_markdown()
        say(f"minilm: allocated {alloc.total:,} of {alloc.limit:,} weights ({alloc.total / alloc.dense_total:.4f} "
            f"of dense); {sum(la.hparams is None for la in alloc.layers)} layer(s) stay dense")
        scfg = alloc.apply(scfg)
    if cfg.projection == "sequential":  # stage by stage against the teacher, a line per layer
        n_blocks = len(as_type(Any, student).encoder.layer)  # a Hugging Face BertModel
        excl = scfg.exclude_modules
        def kept(n: str) -> bool:  # excluded by the config: a regex, or names / name suffixes
            if isinstance(excl, str):
                return re.fullmatch(excl, n) is not None
            return any(n == e or n.endswith("." + e) for e in (excl or ()))
        stages = [[f"encoder.layer.{b}.{part}" for part in group if not kept(f"encoder.layer.{b}.{part}")]
                  for b in range(n_blocks) for group in (("attention.self.query", "attention.self.key",
                                                          "attention.self.value"), ("attention.output.dense",),
                                                         ("intermediate.dense",), ("output.dense",))]
        report = structurize_sequential(student, replace(scfg, calibration=batches), teacher,
                                        stages=[s for s in stages if s], progress=lambda line: say(f"minilm: {line}"))
        layers = list(report.layers)
    else:  # every layer on its own inputs in the teacher (one structurize call), then a line per layer
        layers = list(structurize(student, scfg).layers)
        for r in layers:
            hp = ", ".join(f"{k}={v}" for k, v in r.hparams.items())
            say(f"minilm: {r.name}: {r.structure} {hp}, output error {r.output_error:.3f} (plain projection "
                f"{r.plain_output_error:.3f})")
    record.update(layers=len(layers), seconds=time.perf_counter() - t0,
                  report=[{"name": r.name, "hparams": r.hparams, "params": r.params_after,
                           "output_error": r.output_error, "plain_output_error": r.plain_output_error}
                          for r in layers])
    say(f"minilm: structurized {len(layers)} encoder linear layers to {cfg.structure} in {record['seconds']:.1f} s")
    return record


def run(cfg: MiniLMConfig, out_dir: str | Path = "runs/minilm", resume: bool = False, progress: bool = True,
        command: str | None = None) -> dict[str, Any]:
    from deftly.io.persist import load as load_structured
    from deftly.io.persist import save as save_structured

    def say(line: str) -> None:
        if progress:
            print(line, flush=True)

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
    review_s: list[str] = []
    if cfg.review_fraction > 0:  # never a snippet of the probe (train or test, whatever probe_limit)
        (ptr, _), (pte, _) = reviews.split()
        review_s = review_texts(set(ptr) | set(pte))
        if cfg.train_sentences is not None:
            review_s = review_s[:cfg.train_sentences]
    teacher_eval = minilm_data.embed(teacher, tok, eval_s, max_length=cfg.max_length)

    def stage_row(stage: str, model: nn.Module, structure: str, minutes: float | None) -> dict[str, Any]:
        model.eval()  # no dropout in the measurements (the training loop leaves the student in train mode)
        emb = minilm_data.embed(model, tok, eval_s, max_length=cfg.max_length)
        lin = _encoder_linear_params(model)
        return {"stage": stage, "structure": structure, "linear_params": lin,
                "params": sum(p.numel() for p in model.parameters()), "cosine": embedding_cosine(emb, teacher_eval),
                "probe_acc": probe(model), "minutes": minutes}

    # finished stages are reused by --resume while the settings they depend on are unchanged
    rows_file = out / "rows.json"
    cached = json.loads(rows_file.read_text()) if (resume and rows_file.exists()) else {}
    eval_key = {k: getattr(cfg, k) for k in ("eval_sentences", "probe_limit", "max_length", "seed")}
    proj_key = {**eval_key, **{k: getattr(cfg, k) for k in ("structure", "budget", "calibration_sentences",
                                                             "allocation", "sensitivity_sentences",
                                                             "projection")},
                "calibration": "unpadded"}
    if cfg.attention_budget is not None or cfg.ffn_budget is not None:
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

    # the projected student is saved next to rows.json; --resume reuses it instead of redoing the surgery
    projected_dir = out / "projected"
    surgery = cached.get("surgery") if "projected" in cached else None
    if surgery is not None and projected_dir.is_dir():
        load_structured(student, projected_dir)
        say(f"minilm: reusing the projected student in {projected_dir}")
    else:
        surgery = _surgery(student, teacher, cfg, tok, cal_s, say)
        cached["projected"] = stage_row(f"{cfg.structure} projected", student, cfg.structure, 0.0)
        cached["surgery"] = surgery
        save_structured(student, projected_dir)
        write_json(rows_file, cached)
    surgery_s = surgery["seconds"]
    if not cfg.train_word_embeddings and hasattr(student, "embeddings"):
        student.embeddings.word_embeddings.weight.requires_grad_(False)
    if not cfg.dropout:  # the student matches the teacher's function: no dropout noise while distilling
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    # ---------------------------------------------------------------- healing by distillation
    pools = [train_s] + ([review_s] if review_s else [])
    if cfg.group_by_length:  # each pool sorted by token length; a batch is a random run of neighbours
        by_length = [np.argsort(np.asarray([len(ids) for ids in tok(pool, truncation=True,
                                                                    max_length=cfg.max_length)["input_ids"]]),
                                kind="stable") for pool in pools]

    def batch_of(step: int) -> dict[str, torch.Tensor]:
        g = np.random.RandomState((cfg.seed * 7919 + step) % (2**32))
        k = int(g.rand() < cfg.review_fraction) if review_s else 0  # no extra draw without reviews
        pool = pools[k]
        if cfg.group_by_length:
            start = g.randint(0, max(len(pool) - cfg.batch_size, 0) + 1)
            idx = by_length[k][start:start + cfg.batch_size]
        else:
            idx = g.randint(0, len(pool), size=cfg.batch_size)
        enc = tok([pool[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_length,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    loss_fn = distillation_loss(teacher, cfg.cosine_weight, cfg.hidden_weight, teacher_bf16=cfg.teacher_bf16)
    trainable = [p for p in student.parameters() if p.requires_grad]

    if cfg.max_steps is not None:
        steps = cfg.max_steps
    else:
        opt = torch.optim.AdamW(trainable, lr=0.0)
        if cfg.group_by_length:  # batch lengths vary: mean time over 8 batches
            probe_batches = [batch_of(i) for i in range(8)]
            now = time.perf_counter if cfg.clock == "wall" else time.process_time
            opt.zero_grad(set_to_none=True)
            loss_fn(student, probe_batches[0]).backward()  # warm-up
            t0 = now()
            for b in probe_batches:
                opt.zero_grad(set_to_none=True)
                loss_fn(student, b).backward()
                opt.step()
            st = (now() - t0) / len(probe_batches)
        else:
            probe_batch = batch_of(0)

            def one() -> None:
                opt.zero_grad(set_to_none=True)
                loss_fn(student, probe_batch).backward()

            st = median_step_time(one, repeats=3, warmup=1, clock=cfg.clock)
        student.zero_grad(set_to_none=True)
        steps = max(10, int(cfg.minutes * 60 / (st * 1.2)))
        del opt
    tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, max(steps // 10, 1)),
                       min_lr_ratio=cfg.min_lr_ratio,
                       mup=cfg.mup, eval_every=0, checkpoint_every=max(steps // 20, 1), seed=cfg.seed,
                       max_time=cfg.minutes * 60, progress=progress, label=f"minilm distil {cfg.structure}",
                       grad_clip=1.0, clock=cfg.clock,
                       max_lr_mult=None)  # distillation from projected weights: measured with uncapped rates
    emb_modules = (student.embeddings,) if hasattr(student, "embeddings") else ()
    student.train()  # the per-factor rates are measured in training mode (the stage rows left it in eval)
    res = train(student, batch_of, loss_fn, tcfg, checkpoint_path=out / "student.safetensors", resume=resume,
                exclude_from_mup=tuple(m for m in emb_modules))
    student_dir = save_structured(student, out / "student")
    say(f"minilm: healed student saved to {student_dir} (deftly.load(model, {str(student_dir)!r}) on a freshly "
        f"loaded all-MiniLM-L6-v2)")
    healed = stage_row(f"{cfg.structure} healed", student, cfg.structure, res.train_time / 60.0)
    healed["clock"] = cfg.clock
    healed["steps"] = res.step
    rows = [dense_row, cached["projected"], healed]
    for r in rows:
        r["linear_fraction"] = r["linear_params"] / dense_lin
        r["probe_rel"] = r["probe_acc"] / dense_row["probe_acc"]
    kinds = "".join(f", {k} linears at <= {v:.1%}" for k, v in (("attention", cfg.attention_budget),
                                                                 ("FFN", cfg.ffn_budget)) if v is not None)
    alloc_text = ("per-layer budgets by sensitivity (same total)" if surgery.get("allocation") == "sensitivity"
                  else "every layer at the budget")
    loss_text = (f"token-state MSE (normalised) + {cfg.cosine_weight:g} x (1 - cosine of sentence embeddings)"
                 + (f" + {cfg.hidden_weight:g} x mean normalised MSE of the intermediate layers' token states"
                    if cfg.hidden_weight > 0 else ""))
    text_src = "Wikipedia sentences" + (f" ({1 - cfg.review_fraction:.0%}) and review snippets not in the probe "
                                        f"({cfg.review_fraction:.0%} of batches, {len(review_s):,} snippets)"
                                        if review_s else "")
    notes = [(f"all-MiniLM-L6-v2 (real weights); {surgery['layers']} encoder linear layers -> {cfg.structure} at "
              f"<= {cfg.budget:.0%} of their dense weights in total{kinds}, {alloc_text}; projected "
              + ("sequentially (each layer fitted to the teacher's output from its inputs in the student) "
                 if surgery.get("projection", "independent") == "sequential" else "independently ")
              + f"with activation-aware calibration ({len(cal_s)} unpadded sentences), surgery {surgery_s:.1f} s."),
             (f"healing: {res.step} distillation steps ({res.train_time / 60:.1f} min of training), batch "
              f"{cfg.batch_size} {text_src} (<= {cfg.max_length} tokens"
              + (", grouped by length" if cfg.group_by_length else "") + f") from {len(train_s):,} sentences; "
              f"loss = {loss_text}; teacher in {'bfloat16' if cfg.teacher_bf16 else 'float32'}, word embeddings "
              f"{'trained' if cfg.train_word_embeddings else 'frozen'}, student dropout "
              f"{'on' if cfg.dropout else 'off'}; AdamW lr {cfg.lr}, cosine schedule to "
              f"{cfg.min_lr_ratio:g} x lr; time limit {cfg.minutes} min of "
              + ("wall-clock time." if cfg.clock == "wall" else "CPU time of this process (time.process_time).")),
             (f"cosine: mean over {len(eval_s)} held-out Wikipedia sentences; probe: logistic regression "
              f"(C=1) on embeddings of {len(probe.data[0])} / {len(probe.data[2])} rotten-tomatoes snippets "
              "(fixed 70/30 split, seed 0)."),
             f"healed student: deftly.save format in {student_dir} (loadable with deftly.load)."]
    plots = [pareto_plot([{**r, "x": r["linear_params"], "y": 100 * r["probe_acc"], "structure": r["stage"]}
                          for r in rows], "x", "y", out / "pareto.png",
                         title="MiniLM: sentiment probe vs encoder linear parameters",
                         xlabel="encoder linear weights (log scale)", ylabel="probe accuracy (%)")]
    config = {**asdict(cfg), "wall_time": time.perf_counter() - t_start, "train_sentences_n": len(train_s),
              "review_snippets_n": len(review_s), "surgery": surgery.get("report"),
              "budgets": surgery.get("budgets")}
    write_run(out, recipe="compress-minilm", config=config, rows=rows, columns=COLUMNS, notes=notes, plots=plots,
              command=command, extra={"losses": res.losses[:: max(1, len(res.losses) // 200)]})
    return {"rows": rows, "notes": notes, "out_dir": str(out), "student_dir": str(student_dir), "model": student}
