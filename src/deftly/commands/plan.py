"""``deftly plan``: what structurizing a model would save (parameters, FLOPs per token, weight memory),
per kind of layer, from its config alone on the meta device: no weights downloaded or allocated.

    deftly plan llama-7b --structure monarch --budget 0.25
    deftly plan path/to/config.json --structure lowrank --budget 0.25 --target-modules q_proj v_proj

See :mod:`deftly.surgery.plan`.
"""

from __future__ import annotations

import argparse

HELP = "parameters, FLOPs/token and weight memory a structurized model would have (config only, meta device)"

_REGEX_CHARS = set("*+?[](){}|^$\\")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="llama-7b, gpt2-xl, bert-base, or a path to a Hugging Face config.json or model "
                             "directory")
    parser.add_argument("--structure", required=True, help="registered structure, e.g. monarch or lowrank")
    parser.add_argument("--budget", type=float, default=None,
                        help="fraction of each targeted layer's parameters (or FLOPs, --budget-kind flops) to "
                             "keep, e.g. 0.25 (default: the structure's default hyperparameters)")
    parser.add_argument("--budget-kind", choices=["params", "flops"], default="params")
    parser.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                        help="module names or suffixes (e.g. q_proj v_proj), one regex, or all-linear (the "
                             "default: every linear layer but the output head)")
    parser.add_argument("--exclude-modules", nargs="+", default=None, metavar="NAME",
                        help="names, suffixes or one regex to leave dense")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")


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
    from ..surgery.plan import plan

    cfg = StructureConfig(structure=args.structure, budget=args.budget, budget_kind=args.budget_kind,
                          target_modules=_modules_arg(args.target_modules),
                          exclude_modules=_modules_arg(args.exclude_modules), init="random")
    result = plan(args.model, cfg)
    print(f"{result.title()}\n\n{result.to_markdown()}" if args.markdown else result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0
