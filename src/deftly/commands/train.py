"""``deftly train fashion-mnist|charlm``: train dense and structured models on real data, compare them.

Each run directory gets ``results.json`` (config, seed, versions, metrics), ``results.md`` and PNG plots;
every model checkpoints atomically and ``--resume`` continues a killed run where it stopped.
"""

from __future__ import annotations

import argparse
import sys

HELP = "train dense vs structured models on real data (fashion-mnist MLP/Mixer, Wikipedia char-LM)"


def _structures(text: str) -> list[str]:
    """``--structures``: names separated by commas (spaces allowed); an empty entry (``dense,,monarch``,
    a trailing comma) is an error, not silently dropped. Names are checked against the registry when the
    command runs (:func:`_resolve`)."""
    names: list[str] = []
    for part in text.split(","):
        if not part.split():
            raise argparse.ArgumentTypeError(f"{text!r} has an empty structure name (a stray comma?); use e.g. "
                                             f"dense,monarch")
        names += part.split()
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    fm = sub.add_parser("fashion-mnist", help="Fashion-MNIST MLP or MLP-Mixer, hidden layers at a budget")
    fm.add_argument("--structures", type=_structures, default=None,
                    help="comma-separated structures, or 'all' (default: dense,monarch,lrbd,lowrank,blockdiag,"
                         "butterfly)")
    fm.add_argument("--fraction", type=float, default=0.1, help="hidden-layer parameter budget (default 0.1)")
    fm.add_argument("--model", choices=["mlp", "mixer"], default="mlp")
    fm.add_argument("--width", type=int, default=None, help="hidden width (default: mlp 1024, mixer 128)")
    fm.add_argument("--depth", type=int, default=None, help="mlp: number of layers before the readout "
                                                            "(default 3); mixer: blocks (default 4)")
    fm.add_argument("--epochs", type=int, default=3)
    fm.add_argument("--batch-size", type=int, default=256)
    fm.add_argument("--lr", type=float, default=1e-3)
    fm.add_argument("--no-mup", action="store_true", help="one global learning rate instead of per-factor")
    fm.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    fm.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    _common(fm, "runs/fashion-mnist")

    lm = sub.add_parser("charlm", help="character-level GPT on Wikipedia text; val bits/char at equal steps "
                                       "and equal wall-clock")
    lm.add_argument("--structures", type=_structures, default=None,
                    help="comma-separated structures, or 'all' (default: dense,blockdiag,lowrank)")
    lm.add_argument("--fraction", type=float, default=0.25, help="linear-layer parameter budget (default 0.25)")
    lm.add_argument("--layers", type=int, default=4)
    lm.add_argument("--dim", "--d", dest="d", type=int, default=256,
                    help="model width (default 256; use --dim under torchrun, which claims --d)")
    lm.add_argument("--heads", type=int, default=4)
    lm.add_argument("--ctx", type=int, default=128)
    lm.add_argument("--batch-size", type=int, default=16)
    lm.add_argument("--steps", type=int, default=600, help="dense steps (structured runs may run longer to "
                                                          "cover dense's wall-clock time)")
    lm.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (default 1e-3)")
    lm.add_argument("--warmup", type=int, default=50)
    lm.add_argument("--eval-every", type=int, default=50)
    lm.add_argument("--eval-windows", type=int, default=128)
    lm.add_argument("--text-limit", type=int, default=None, help="use the first N characters of the text")
    lm.add_argument("--no-mup", action="store_true", help="one global learning rate instead of per-factor")
    lm.add_argument("--max-lr-mult", type=_cap, default=2.0,
                    help="cap on the per-factor learning-rate multipliers of the structured models (default 2, "
                         "deftly.param_groups' default; 'none': the measured multipliers uncapped)")
    lm.add_argument("--mixer", choices=["attention", "monarch-mixer"], default="attention",
                    help="sequence mixer of every block: softmax attention (default) or monarch-mixer, the gated "
                         "long convolution of deftly.mixers (no learned positions, no more parameters)")
    _common(lm, "runs/charlm")


def _cap(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--max-lr-mult {text}: must be a positive number or 'none'")
    return value


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"run directory (default {default_out})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--strategy", choices=["none", "ddp", "fsdp2"], default="none",
                   help="data parallelism under `torchrun --nproc_per_node=N -m deftly train ...`: each rank "
                        "trains on its slice of every global batch (default none: one process)")
    p.add_argument("--clock", choices=["wall", "process"], default="wall",
                   help="time measure: wall-clock, or this process's CPU time (robust on a shared machine)")


def _resolve(names: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """The structures to run: ``default``, every registered one (``all``), or ``names`` checked against
    the registry (an unknown name is an error naming the closest registered one)."""
    if names is None:
        return default
    from ..core.registry import structures

    if names == ["all"]:
        return ("dense", *[n for n in structures() if n != "dense"])
    from ..train.common import check_structures

    return check_structures(names, "--structures")


def command_line(args: argparse.Namespace) -> str:
    """The full command line of this run (``deftly ARGS``, shell-quoted), for results.json."""
    import shlex

    return getattr(args, "_command_line", None) or "deftly " + shlex.join(sys.argv[1:])


def run(args: argparse.Namespace) -> int:
    from .. import distributed as ddist

    command = command_line(args)
    if args.strategy != "none":
        info = ddist.setup()
        if not info.distributed:
            raise ValueError(f"--strategy {args.strategy} needs several processes: launch with `torchrun "
                             f"--standalone --nproc_per_node=2 -m deftly train {args.recipe} --strategy "
                             f"{args.strategy} ...` (or use --strategy none)")
        command = f"torchrun --standalone --nproc_per_node={info.world_size} -m {command}"
        args._command_line = command  # what an interrupted run is continued with
    main = ddist.is_main()
    try:
        res = _run_recipe(args, command)
    finally:
        ddist.teardown()
    if main:
        print((__import__("pathlib").Path(res["out_dir"]) / "results.md").read_text())
    return 0


def _run_recipe(args: argparse.Namespace, command: str | None) -> dict:
    if args.recipe == "fashion-mnist":
        from ..train.fashion import FashionConfig
        from ..train.fashion import run as run_fm

        default_width, default_depth = (1024, 3) if args.model == "mlp" else (128, 4)
        fm_cfg = FashionConfig(structures=_resolve(args.structures, FashionConfig.structures),
                               fraction=args.fraction, model=args.model, width=args.width or default_width,
                               depth=args.depth or default_depth, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, mup=not args.no_mup, seed=args.seed, train_limit=args.train_limit,
                               test_limit=args.test_limit, threads=args.threads)
        return run_fm(fm_cfg, args.out, resume=args.resume, progress=not args.quiet, command=command,
                      strategy=args.strategy)
    else:
        from ..train.charlm import CharLMConfig
        from ..train.charlm import run as run_lm

        lm_cfg = CharLMConfig(structures=_resolve(args.structures, CharLMConfig.structures),
                              fraction=args.fraction, layers=args.layers, d=args.d, heads=args.heads, ctx=args.ctx,
                              batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup,
                              eval_every=args.eval_every, eval_windows=args.eval_windows, seed=args.seed,
                              text_limit=args.text_limit, threads=args.threads, mup=not args.no_mup,
                              max_lr_mult=args.max_lr_mult, clock=args.clock, mixer=args.mixer)
        return run_lm(lm_cfg, args.out, resume=args.resume, progress=not args.quiet, command=command,
                      strategy=args.strategy)
