"""The ``deftly`` command line: one subcommand per module of :mod:`deftly.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports nothing heavy at module level, so ``deftly --help`` stays fast. Errors a user can fix
(``ValueError``, ``FileNotFoundError``, ...) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def _command_modules() -> dict[str, object]:
    mods = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return mods


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints its usage block before the error; deftly prints one line (subparsers inherit it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="deftly", description="Structured matrices as drop-in nn.Linear layers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _command_modules().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"deftly {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deftly {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
