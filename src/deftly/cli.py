"""The ``deftly`` command line: one subcommand per module of :mod:`deftly.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and
imports nothing heavy at module level, so ``deftly --help`` stays fast.

Errors print ONE line on stderr and no traceback (``--debug`` or ``DEFTLY_DEBUG=1`` shows it): errors a
user can fix (bad values, missing files or data, a missing third-party package) exit with status 2, anything
unexpected with status 1 (a bug: rerun with ``--debug`` and report it), including an ImportError from deftly's
own modules. A misspelt command, choice or option is told the closest valid one (``Did you mean 'train'?``). Ctrl-C exits with 130 and says
how to continue: the exact command with ``--resume`` for commands that checkpoint, or where a command's
partial results are (``args._interrupt_note``, set by the command as it goes).

``args._argv`` (the arguments parsed) and ``args._command_line`` (``deftly ARGS``, shell-quoted) are
set for the commands: they record the full command line in their ``results.json``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import pkgutil
import shlex
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any, NoReturn

from . import commands


def _command_modules() -> dict[str, ModuleType]:
    mods = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods[info.name.replace("_", "-")] = importlib.import_module(f"{commands.__name__}.{info.name}")
    return mods


def _closest(word: str, choices: Iterable[Any]) -> str | None:
    """The choice closest to ``word`` (difflib; options compared without their leading dashes)."""
    named = {str(c).lstrip("-"): str(c) for c in choices}
    close = difflib.get_close_matches(word.lstrip("-"), list(named), n=1)
    return named[close[0]] if close else None


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints its usage block before the error; deftly prints one line (subparsers inherit it),
    and a misspelt command, choice or option gets the closest valid one (``Did you mean 'train'?``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # the one place argparse checks a value against ``choices`` (subcommands, recipes, models too)
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            close = _closest(value, action.choices or ()) if isinstance(value, str) else None
            if close is None:
                raise
            raise argparse.ArgumentError(action, f"{err.message}. Did you mean {close!r}?") from None

    def parse_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> Any:
        # argparse reports unknown options from the top parser, which knows none of a subcommand's
        # options: the (innermost) subcommand that got them reports them, with the closest of its options
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self._chosen_subparser(ns)
            options = [s for a in owner._actions for s in a.option_strings]
            bad = [x.split("=", 1)[0] for x in extras if x.startswith("-")]
            close = [(b, c) for b in bad if (c := _closest(b, options)) is not None]
            message = f"unrecognized arguments: {' '.join(extras)}"
            if len(close) == 1:
                message += f". Did you mean {close[0][1]!r}?"
            elif close:
                message += f". Did you mean {', '.join(f'{c!r} for {b!r}' for b, c in close)}?"
            owner.error(message)
        return ns

    def _chosen_subparser(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                name = getattr(ns, action.dest, None)
                chosen = action.choices.get(name) if isinstance(name, str) else None
                if isinstance(chosen, _OneLineErrors):
                    return chosen._chosen_subparser(ns)
        return self


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
        module = getattr(err, "name", None) or ""
        top = module.split(".")[0]
        if isinstance(err, ModuleNotFoundError) and top and top != __name__.split(".")[0]:
            print(f"{where}: error: a package this command needs is missing ({one_line(err)}); install it: "
                  f"pip install {top}", file=sys.stderr)
            return 2
        # deftly's own modules (`cannot import name 'x' from 'deftly....'`), or a name missing from an
        # installed package: not something to pip install, a bug or a broken/mismatched install
        print(f"{where}: error: internal error: {type(err).__name__}"
              f"{f' in module {module!r}' if module else ''}: {one_line(err)} (a bug or a broken install? "
              f"rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: one line, and how to see the traceback
        if debug:
            raise
        print(f"{where}: error: unexpected {type(err).__name__}: {one_line(err)} (a bug? rerun with --debug for "
              f"the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
