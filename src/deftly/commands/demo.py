"""``deftly demo``: the one-command answer to "do structured layers save ~90% of the parameters for free?"

Trains a Fashion-MNIST MLP (60k real images) with its hidden layers dense, and then Monarch, LR+BD,
low-rank, block-diagonal and butterfly (whichever are registered) at ~10% of the hidden layers'
parameters, all for the same number of epochs; prints parameters, FLOPs, training time, test accuracy and
the gap to dense, and writes a Pareto plot (accuracy vs parameters, log scale). A few minutes on 2 cores.
``--full`` also runs the char-LM and MiniLM-compression recipes at their default sizes (much longer).
"""

from __future__ import annotations

import argparse

from .train import _structures

HELP = "the main job: dense vs structured layers on Fashion-MNIST at ~10 percent of the parameters (minutes)"

DEMO_STRUCTURES = ("dense", "monarch", "lrbd", "lowrank", "blockdiag", "butterfly")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--full", action="store_true", help="also run the charlm and minilm recipes (long)")
    parser.add_argument("--structures", type=_structures, default=None,
                        help="comma-separated structures or 'all' (default: dense,monarch,lrbd,lowrank,"
                             "blockdiag,butterfly)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-limit", type=int, default=None, help="quick check: first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="quick check: first N test images")
    parser.add_argument("--resume", action="store_true", help="reuse finished models and checkpoints")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..train.fashion import FashionConfig
    from ..train.fashion import run as run_fm
    from .train import _resolve, command_line

    t0 = time.perf_counter()
    out = Path(args.out)
    command = command_line(args)
    names = _resolve(args.structures, DEMO_STRUCTURES)
    cfg = FashionConfig(structures=names, fraction=args.fraction, model="mlp", width=args.width, depth=3,
                        epochs=args.epochs, threads=args.threads, train_limit=args.train_limit,
                        test_limit=args.test_limit)
    res = run_fm(cfg, out / "fashion-mnist" if args.full else out, resume=args.resume,
                 progress=not args.quiet, command=command)
    print(Path(res["out_dir"], "results.md").read_text())
    dirs = [res["out_dir"]]
    if args.full:
        from ..train.charlm import CharLMConfig
        from ..train.charlm import run as run_lm
        from ..train.minilm import MiniLMConfig
        from ..train.minilm import run as run_ml

        r2 = run_lm(CharLMConfig(threads=args.threads), out / "charlm", resume=args.resume,
                    progress=not args.quiet, command=command)
        print(Path(r2["out_dir"], "results.md").read_text())
        r3 = run_ml(MiniLMConfig(threads=args.threads), out / "minilm", resume=args.resume,
                    progress=not args.quiet, command=command)
        print(Path(r3["out_dir"], "results.md").read_text())
        dirs += [r2["out_dir"], r3["out_dir"]]
    print(f"deftly demo: done in {time.perf_counter() - t0:.0f} s; results in {', '.join(dirs)}"
          + plots_note(dirs[0]))
    return 0


def plots_note(run_dir: str) -> str:
    """`` (pareto.png: ...)`` naming the plots really written in ``run_dir``, or why there are none."""
    import json
    from pathlib import Path

    from ..train.results import plots_skipped_reason

    plots = [p for p in json.loads(Path(run_dir, "results.json").read_text()).get("plots", [])
             if Path(run_dir, p).exists()]
    if plots:
        what = {"pareto.png": "accuracy vs parameters", "curves.png": "accuracy per epoch"}
        return " (" + ", ".join(f"{p}: {what[p]}" if p in what else p for p in plots) + ")"
    reason = plots_skipped_reason()
    return f"; plots skipped: {reason}" if reason else "; no plots"
