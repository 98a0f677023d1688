"""The ``deftly`` command line: one subcommand per module of :mod:`deftly.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports nothing heavy at module level, so ``deftly --help`` stays fast.

Errors print ONE line on stderr and no traceback (``--debug`` or ``DEFTLY_DEBUG=1`` shows it): errors a
user can fix (bad values, missing files or data, a missing optional package) exit with status 2, anything
unexpected with status 1 (a bug: rerun with ``--debug`` and report it). Ctrl-C exits with 130 and says
how to continue: the exact command with ``--resume`` for commands that checkpoint, or where a command's
partial results are (``args._interrupt_note``, set by the command as it goes).

``args._argv`` (the arguments parsed) and ``args._command_line`` (``deftly ARGS``, shell-quoted) are
set for the commands: they record the full command line in their ``results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys
from types import ModuleType
from typing import NoReturn

from . import commands


def _command_modules() -> dict[str, ModuleType]:
    mods = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return mods


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints its usage block before the error; deftly prints one line (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += [sub, *_subparsers(sub)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="deftly", description="Structured matrices as drop-in nn.Linear layers.")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback on errors (also: DEFTLY_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _command_modules().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    for subparser in _subparsers(parser):  # `deftly train charlm ... --debug` works too
        if not any("--debug" in a.option_strings for a in subparser._actions):
            subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                   help="show the full traceback on errors")
    return parser


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (never empty)."""
    text = " ".join(str(err).split()) if not isinstance(err, KeyError) else str(err)
    return text or type(err).__name__


def _resume_hint(args: argparse.Namespace) -> str:
    line = getattr(args, "_command_line", None)
    if line is None or not hasattr(args, "resume"):
        return ""
    argv = getattr(args, "_argv", [])
    again = line if "--resume" in argv else f"{line} --resume"
    out = getattr(args, "out", None)
    kept = f"finished work and checkpoints are kept in {out}; " if out else ""
    return f"; {kept}continue with: {again}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    args._argv = argv
    args._command_line = "deftly " + shlex.join(argv)
    debug = getattr(args, "debug", False) or os.environ.get("DEFTLY_DEBUG", "") not in ("", "0")
    where = f"deftly {args.command}"
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        note = getattr(args, "_interrupt_note", None)
        print(f"{where}: interrupted" + (f"; {note}" if note else _resume_hint(args)), file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError) as err:  # FileNotFoundError, PermissionError, ...
        if debug:
            raise
        print(f"{where}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except ImportError as err:
        if debug:
            raise
        name = (getattr(err, "name", None) or "").split(".")[0]
        fix = f"; install it: pip install {name}" if name else ""
        print(f"{where}: error: a package this command needs is missing ({one_line(err)}){fix}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line, and how to see the traceback
        if debug:
            raise
        print(f"{where}: error: unexpected {type(err).__name__}: {one_line(err)} (a bug? rerun with --debug for "
              f"the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
