"""Run directories: ``results.json`` (config, seed, versions, rows of metrics), ``results.md`` and PNG plots.

Every recipe ends with :func:`write_run`; ``deftly report DIR...`` reads them back with :func:`read_run`
and merges them with :func:`merge`. matplotlib is imported only when a plot is drawn (Agg backend).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_bytes

__all__ = [
    "curves_plot",
    "markdown_table",
    "merge",
    "pareto_plot",
    "plots_skipped_reason",
    "read_run",
    "versions",
    "write_json",
    "write_run",
]


def versions() -> dict[str, Any]:
    import numpy
    import torch

    from .._version import __version__
    from ..core.registry import structures

    return {"deftly": __version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "structures": structures(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: ``(key, header)`` pairs; missing values print as ``-``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def plots_skipped_reason() -> str | None:
    """Why plots cannot be drawn here (one line), or ``None`` when matplotlib is importable."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "matplotlib is not installed (pip install matplotlib, or pip install 'deftly[plot]')"


def _plt():
    """pyplot on the Agg backend, or ``None`` when matplotlib is not installed (plots are then skipped)."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def pareto_plot(rows: Sequence[dict[str, Any]], x: str, y: str, path: str | os.PathLike, *, title: str,
                xlabel: str, ylabel: str, label: str = "structure", group: str | None = None,
                higher_is_better: bool = True) -> Path | None:
    """Scatter of ``y`` against ``x`` (log x), a legend entry per point, the Pareto front as a dashed line.
    Returns ``None`` (no plot) when matplotlib is not installed."""
    plt = _plt()
    if plt is None:
        return None
    pts = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
           and not math.isnan(float(r[y]))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({str(r.get(group, "")) for r in pts}) if group else [""]
    markers = "osD^v<>ph*XP"
    colors = [f"C{i}" for i in range(10)]
    # one colour per point label and one marker per group: a legend names every point unambiguously
    labels = sorted({str(r.get(label, "")) for r in pts}, key=lambda s: [str(r.get(label, "")) for r in pts].index(s))
    for gi, g in enumerate(groups):
        for li, lab in enumerate(labels):
            sel = [r for r in pts if (not group or str(r.get(group, "")) == g) and str(r.get(label, "")) == lab]
            if sel:
                name = f"{lab} ({g})" if group and len(groups) > 1 else lab
                ax.scatter([r[x] for r in sel], [r[y] for r in sel], marker=markers[(gi + li) % len(markers)],
                           color=colors[li % len(colors)], s=45, label=name, zorder=3)
    front, best = [], -math.inf
    for r in sorted(pts, key=lambda r: r[x]):
        v = r[y] if higher_is_better else -r[y]
        if v > best:
            front.append(r)
            best = v
    if len(front) > 1:
        ax.plot([r[x] for r in front], [r[y] for r in front], "--", color="grey", lw=1, zorder=2,
                label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def curves_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *,
                title: str, xlabel: str, ylabel: str, logx: bool = False) -> Path | None:
    """Line plot of several ``name -> (xs, ys)`` curves (``None`` without matplotlib)."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        if len(xs):
            ax.plot(xs, ys, marker=".", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    _save(fig, path)
    plt.close(fig)
    return path


def write_run(out_dir: str | os.PathLike, *, recipe: str, config: dict[str, Any], rows: list[dict[str, Any]],
              columns: Sequence[tuple[str, str]], notes: Iterable[str] = (),
              plots: Iterable[str | os.PathLike[str] | None] = (), extra: dict[str, Any] | None = None,
              command: str | None = None) -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the Markdown path. ``plots``:
    the paths :func:`pareto_plot` / :func:`curves_plot` returned (``None``: not drawn, noted as skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    wanted = list(plots)
    drawn = [str(p) for p in wanted if p is not None]
    if len(drawn) < len(wanted):
        notes.append(f"plots skipped: {plots_skipped_reason() or 'matplotlib could not draw them'}")
    if command is None and Path(sys.argv[0]).name == "deftly":
        command = shlex.join(["deftly", *sys.argv[1:]])
    payload = {"recipe": recipe, "command": command, "argv": list(sys.argv), "config": config,
               "seed": config.get("seed"),
               "versions": versions(), "columns": [list(c) for c in columns], "rows": rows, "notes": notes,
               "plots": [Path(p).name for p in drawn], **(extra or {})}
    write_json(out / "results.json", payload)
    md = [f"# {recipe}", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [markdown_table(rows, columns), ""]
    md += [f"- {n}" for n in notes]
    if notes:
        md.append("")
    v = payload["versions"]
    md.append(f"deftly {v['deftly']}, torch {v['torch']}, {v['torch_threads']} threads, {v['platform']}, "
              f"{v['date']}; seed {config.get('seed')}.")
    md += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in drawn]]
    atomic_write_bytes(out / "results.md", ("\n".join(md) + "\n").encode())
    return out / "results.md"


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of a run directory (or the file itself), with its ``dir`` added."""
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{p} has no results.json; pass run directories written by `deftly train`, "
                                "`deftly compress` or `deftly demo`")
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{f} is not valid JSON ({err}); rerun the recipe that wrote it") from None
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{f} has no 'rows'; it was not written by a deftly recipe")
    data["dir"] = str(f.parent)
    return data


def merge(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """All rows of all runs with ``run`` (directory name) and ``recipe`` columns; the union of columns."""
    rows: list[dict[str, Any]] = []
    columns: list[tuple[str, str]] = [("run", "run"), ("recipe", "recipe")]
    seen = {"run", "recipe"}
    for run in runs:
        for key, header in run.get("columns", []):
            if key not in seen:
                seen.add(key)
                columns.append((key, header))
        for r in run["rows"]:
            rows.append({"run": Path(run["dir"]).name, "recipe": run.get("recipe", "?"), **r})
    return rows, columns
