"""``deftly plan``: what structurizing a model would save (parameters, FLOPs per token, weight memory),
per kind of layer, from its config alone on the meta device: no weights downloaded or allocated.

    deftly plan llama-7b --structure monarch --budget 0.25
    deftly plan path/to/config.json --structure lowrank --budget 0.25 --target-modules q_proj v_proj
    deftly plan bert-base --structure monarch --budget 0.25 --speed 4096     # + measured speed-up
    deftly plan bert-base --structure monarch,lowrank --budget 0.5 --budget-kind latency --speed 512

See :mod:`deftly.surgery.plan`.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "parameters, FLOPs/token and weight memory a structurized model would have (config only, meta device)"

_REGEX_CHARS = set("*+?[](){}|^$\\")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="llama-7b, gpt2-xl, bert-base, or a path to a Hugging Face config.json or model "
                             "directory")
    parser.add_argument("--structure", required=True,
                        help="registered structure, e.g. monarch or lowrank; with --budget-kind latency a "
                             "comma-separated list of candidates, e.g. monarch,lowrank")
    parser.add_argument("--budget", type=float, default=None,
                        help="fraction of each targeted layer's parameters (or FLOPs, --budget-kind flops; or "
                             "dense time on this machine, --budget-kind latency) to keep, e.g. 0.25 (default: "
                             "the structure's default hyperparameters)")
    parser.add_argument("--budget-kind", choices=["params", "flops", "latency"], default="params",
                        help="latency: each layer's structure and hyperparameters from timings measured on this "
                             "machine (at --speed rows per call, default 4096; cached)")
    parser.add_argument("--speed", type=_rows, default=None, metavar="ROWS",
                        help="also show the speed-up of the linear layers (dense time / planned time), measured "
                             "on this machine at ROWS rows per call (batch x tokens), e.g. 4096; cached in "
                             "$DEFTLY_CACHE/latency.json")
    parser.add_argument("--speed-mode", choices=["infer", "train"], default=None,
                        help="what --speed (and --budget-kind latency) time: infer (forward, the default) or "
                             "train (forward + backward)")
    parser.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                        help="module names or suffixes (e.g. q_proj v_proj), one regex, or all-linear (the "
                             "default: every linear layer but the output head)")
    parser.add_argument("--exclude-modules", nargs="+", default=None, metavar="NAME",
                        help="names, suffixes or one regex to leave dense")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")


def _rows(text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        rows = 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows; pass a whole number >= 1 "
                                         f"(rows per call: batch x tokens), e.g. --speed 4096")
    return rows


def _modules_arg(values: list[str] | None):
    """One value that is ``all-linear`` or looks like a regex stays a string; otherwise a list."""
    if values is None:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return list(values)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..surgery.config import StructureConfig
    from ..surgery.latency import Latency
    from ..surgery.plan import plan

    latency = args.budget_kind == "latency"
    if args.speed_mode and args.speed is None and not latency:
        raise ValueError(f"--speed-mode {args.speed_mode} needs --speed ROWS (e.g. --speed 4096) or "
                         f"--budget-kind latency: it says how they time the layers")
    structure: Any = args.structure  # a list of candidates with --budget-kind latency
    if "," in args.structure:
        if not latency:
            raise ValueError(f"--structure {args.structure!r}: several structures are candidates of a latency "
                             f"budget; add --budget-kind latency, or name one structure")
        structure = [s.strip() for s in args.structure.split(",") if s.strip()]
    mode = args.speed_mode or "infer"
    speed = Latency(rows=args.speed, mode=mode) if args.speed is not None else None
    cfg = StructureConfig(structure=structure, budget=args.budget, budget_kind=args.budget_kind,
                          target_modules=_modules_arg(args.target_modules),
                          exclude_modules=_modules_arg(args.exclude_modules), init="random",
                          latency=(speed or Latency(mode=mode)) if latency else None)
    result = plan(args.model, cfg, speed=speed)
    print(f"{result.title()}\n\n{result.to_markdown()}" if args.markdown else result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0
