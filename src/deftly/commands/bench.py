"""``deftly bench``: time every structure against ``nn.Linear`` (see :mod:`deftly.bench`).

Quick default (n = 4096, fp32, batch 1/64/2048, forward and forward+backward, about two minutes on two
cores); ``--full`` for the whole grid. Writes ``<out>.json``, ``<out>.txt`` and ``<out>.png``.
``python benchmarks/bench.py`` runs the same suite and also checks the issues' speed targets.
"""

from __future__ import annotations

import argparse

from ..bench.cli import HELP, add_arguments

__all__ = ["HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from ..bench.cli import main_args

    return main_args(args)
