"""``deftly demo``: the one-command answer to "do structured layers save ~90% of the parameters for free?"

Trains a Fashion-MNIST MLP (60k real images) with its hidden layers dense, and then Monarch, LR+BD,
low-rank, block-diagonal and butterfly (whichever are registered) at ~10% of the hidden layers'
parameters, all for the same number of epochs; prints parameters, FLOPs, training time, test accuracy and
the gap to dense, and writes a Pareto plot (accuracy vs parameters, log scale). A few minutes on 2 cores.
``--full`` also runs the char-LM and MiniLM-compression recipes at their default sizes (much longer).
"""

from __future__ import annotations

import argparse

HELP = "the main job: dense vs structured layers on Fashion-MNIST at ~10 percent of the parameters (minutes)"

DEMO_STRUCTURES = ("dense", "monarch", "lrbd", "lowrank", "blockdiag", "butterfly")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--full", action="store_true", help="also run the charlm and minilm recipes (long)")
    parser.add_argument("--structures", default=None,
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
    from .train import _resolve, _structures

    t0 = time.perf_counter()
    out = Path(args.out)
    names = _resolve(_structures(args.structures) if args.structures else None, DEMO_STRUCTURES)
    cfg = FashionConfig(structures=names, fraction=args.fraction, model="mlp", width=args.width, depth=3,
                        epochs=args.epochs, threads=args.threads, train_limit=args.train_limit,
                        test_limit=args.test_limit)
    res = run_fm(cfg, out / "fashion-mnist" if args.full else out, resume=args.resume,
                 progress=not args.quiet, command="deftly demo")
    print(Path(res["out_dir"], "results.md").read_text())
    dirs = [res["out_dir"]]
    if args.full:
        from ..train.charlm import CharLMConfig
        from ..train.charlm import run as run_lm
        from ..train.minilm import MiniLMConfig
        from ..train.minilm import run as run_ml

        r2 = run_lm(CharLMConfig(threads=args.threads), out / "charlm", resume=args.resume,
                    progress=not args.quiet, command="deftly demo --full")
        print(Path(r2["out_dir"], "results.md").read_text())
        r3 = run_ml(MiniLMConfig(threads=args.threads), out / "minilm", resume=args.resume,
                    progress=not args.quiet, command="deftly demo --full")
        print(Path(r3["out_dir"], "results.md").read_text())
        dirs += [r2["out_dir"], r3["out_dir"]]
    print(f"deftly demo: done in {time.perf_counter() - t0:.0f} s; results in {', '.join(dirs)} "
          f"(pareto.png: accuracy vs parameters)")
    return 0
