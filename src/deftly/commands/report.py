"""``deftly report DIR...``: merge the results of several runs into one table (and a Pareto plot)."""

from __future__ import annotations

import argparse

HELP = "merge run directories (results.json) into one Markdown table and Pareto plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories written by train/compress/demo")
    parser.add_argument("--out", default=None, help="also write results.md/results.json/pareto.png here")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..train.results import markdown_table, merge, pareto_plot, read_run, write_run

    runs = [read_run(d) for d in args.dirs]
    rows, columns = merge(runs)
    table = markdown_table(rows, columns)
    print(table)
    if args.out:
        out = Path(args.out)
        plots = []
        # one Pareto plot per metric that several runs share: test accuracy (classifiers) and val loss (LMs)
        for key, size, ylabel, name, better in (("test_acc", "hidden_params", "test accuracy (%)", "pareto.png", True),
                                                ("val_bpc_equal_steps", "linear_params", "val bits/char",
                                                 "pareto_lm.png", False)):
            pts = [{**r, "x": r.get(size), "y": r.get(key)} for r in rows]
            pts = [p for p in pts if p["x"] is not None and p["y"] is not None]
            if pts:
                plots.append(pareto_plot(pts, "x", "y", out / name, title=f"merged runs: {ylabel}",
                                         xlabel="structured-layer parameters (log scale)", ylabel=ylabel,
                                         group="run", higher_is_better=better))
        notes = [f"merged from: {', '.join(r['dir'] for r in runs)}"]
        write_run(out, recipe="report", config={"dirs": [r["dir"] for r in runs], "seed": None}, rows=rows,
                  columns=columns, notes=notes, plots=plots)
        print(f"\nwrote {out / 'results.md'}")
    return 0
