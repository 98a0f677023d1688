"""``deftly compress minilm``: structurize a real pretrained model at a budget and heal it by distillation."""

from __future__ import annotations

import argparse

HELP = "compress a pretrained model (all-MiniLM-L6-v2) to structured layers and heal it by distillation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    p = sub.add_parser("minilm", help="all-MiniLM-L6-v2 encoder linear layers -> STRUCTURE at BUDGET, then "
                                      "distil from the dense teacher; cosine and sentiment-probe accuracy")
    p.add_argument("--structure", default="lowrank", help="registered structure (default lowrank)")
    p.add_argument("--budget", type=float, default=0.25, help="fraction of the encoder linear parameters "
                                                              "(default 0.25)")
    p.add_argument("--minutes", type=float, default=20.0, help="distillation time limit (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per distillation step (default 32)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (default 64)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine schedule decays the lr to lr x this (default 0.1)")
    p.add_argument("--cosine-weight", type=float, default=10.0,
                   help="weight of (1 - cosine of the sentence embeddings) in the distillation loss (default 10)")
    p.add_argument("--hidden-weight", type=float, default=None,
                   help="weight of layer-wise matching: mean normalised MSE of every intermediate layer's token "
                        "states (default 1; 0: last layer only)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="batch sentences of similar token length together (less padding: more steps per minute; "
                        "default on)")
    p.add_argument("--allocation", choices=["sensitivity", "uniform"], default=None,
                   help="per-layer budgets by sensitivity with the same total (default), or every layer at "
                        "--budget")
    p.add_argument("--projection", choices=["sequential", "independent"], default=None,
                   help="sequential (default): each layer fitted to the teacher's output from its inputs in the "
                        "partly compressed student; independent: each on the teacher's inputs")
    p.add_argument("--calibration-sentences", type=int, default=None,
                   help="Wikipedia sentences for the activation-aware projection (default 1024)")
    p.add_argument("--sensitivity-sentences", type=int, default=None,
                   help="of those, how many measure each layer's sensitivity (default 256)")
    p.add_argument("--review-fraction", type=float, default=None,
                   help="share of distillation batches drawn from movie-review snippets that are not the probe's "
                        "(default 0)")
    p.add_argument("--teacher-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="run the teacher under bfloat16 autocast during distillation (default on)")
    p.add_argument("--train-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="train the word embeddings too (default off: frozen, more steps per minute)")
    p.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the model's dropout in the student while distilling (default off)")
    p.add_argument("--attention-budget", type=float, default=None,
                   help="budget of the attention linears (query/key/value/output) instead of --budget")
    p.add_argument("--ffn-budget", type=float, default=None,
                   help="budget of the FFN linears (intermediate/output) instead of --budget")
    p.add_argument("--max-steps", type=int, default=None, help="cap on distillation steps")
    p.add_argument("--eval-sentences", type=int, default=500,
                   help="held-out Wikipedia sentences for the cosine (default 500)")
    p.add_argument("--probe-limit", type=int, default=None, help="use the first N snippets of each split")
    p.add_argument("--out", default="runs/minilm", help="run directory (default runs/minilm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence split and batches")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT's cached teacher/projected rows and projected student, and continue a killed "
                        "distillation from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="what --minutes counts: wall-clock, or this process's CPU time (robust on a shared machine)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train.common import check_counts, check_structures
    from ..train.minilm import MiniLMConfig
    from ..train.minilm import run as run_ml
    from .train import command_line

    command = command_line(args)
    check_structures([args.structure], "--structure")  # unknown: the choices and the closest match
    check_counts("deftly compress minilm", ("max_steps", "probe_limit", "threads"), batch_size=args.batch_size,
                 max_length=args.max_length, eval_sentences=args.eval_sentences, max_steps=args.max_steps,
                 probe_limit=args.probe_limit, threads=args.threads)
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise ValueError(f"--lr {args.lr}: must be a positive number, e.g. 1e-3")
    check_counts("deftly compress minilm", ("calibration_sentences", "sensitivity_sentences"),
                 calibration_sentences=args.calibration_sentences, sensitivity_sentences=args.sensitivity_sentences)
    # options left unset keep MiniLMConfig's defaults (one place for them)
    given = {k: getattr(args, k) for k in ("lr", "hidden_weight", "group_by_length", "allocation", "projection",
                                           "calibration_sentences", "sensitivity_sentences", "review_fraction",
                                           "teacher_bf16", "train_word_embeddings", "dropout")
             if getattr(args, k) is not None}
    cfg = MiniLMConfig(structure=args.structure, budget=args.budget, minutes=args.minutes,
                       batch_size=args.batch_size, max_length=args.max_length, max_steps=args.max_steps,
                       eval_sentences=args.eval_sentences, probe_limit=args.probe_limit, seed=args.seed,
                       threads=args.threads, clock=args.clock, min_lr_ratio=args.min_lr_ratio,
                       cosine_weight=args.cosine_weight, attention_budget=args.attention_budget,
                       ffn_budget=args.ffn_budget, **given)
    res = run_ml(cfg, args.out, resume=args.resume, progress=not args.quiet, command=command)
    print(Path(res["out_dir"], "results.md").read_text())
    return 0
