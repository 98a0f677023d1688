"""``deftly show``: a table of every registered structure and a picture of each one's dense matrix.

For each structure at each size: hyperparameters (the constructor's defaults), parameters, FLOPs per
token, compression vs dense, and a self-check error ``max |forward(x) - (x @ to_dense().T + b)|``
(float32, relative to ``max |y|``). The PNG draws ``|to_dense()|`` of each structure at a small size so
the sparsity patterns (Monarch, butterfly, banded, ...) are visible. The self-check runs the
structure's own multiply (``use_backend("native")``), never the dense-weight fallback of the dispatcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.base import StructuredLinear

HELP = "print every registered structure's parameters, FLOPs and self-check error; draw their matrices"


def _parse_size(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        size = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not of the form INxOUT, e.g. 1024x4096") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must have positive dimensions")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_parse_size, nargs="+", default=[(256, 256), (384, 1536)],
                        metavar="INxOUT", help="layer sizes (default: 256x256 384x1536)")
    parser.add_argument("--structures", nargs="+", default=None, metavar="NAME",
                        help="structures to show (default: all registered)")
    parser.add_argument("--png", default="deftly_show.png", help="where to write the picture ('' to skip)")
    parser.add_argument("--picture-size", type=int, default=64, help="matrix size drawn in the PNG")
    parser.add_argument("--seed", type=int, default=0)


def build_default(name: str, in_f: int, out_f: int, **kw: Any) -> StructuredLinear:
    """The structure with its constructor defaults, or its first example where defaults do not fit."""
    from ..core.registry import get, make

    try:
        return make(name, in_f, out_f, **kw)
    except ValueError:
        return make(name, in_f, out_f, **get(name).examples(in_f, out_f)[0], **kw)


def rows_for(names: list[str], sizes: list[tuple[int, int]], seed: int = 0) -> list[dict[str, Any]]:
    import torch

    from ..kernels import use_backend

    rows = []
    for in_f, out_f in sizes:
        for name in names:
            torch.manual_seed(seed)
            layer = build_default(name, in_f, out_f)
            x = torch.randn(8, in_f)
            # the structure's own multiply, not a dispatch to its materialised dense weight
            with torch.no_grad(), use_backend("native"):
                y = layer(x)
                dense = layer.to_dense()
                ref = x.to(dense.dtype) @ dense.T + (layer.bias if layer.bias is not None else 0)
                err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            rows.append({
                "size": f"{in_f}x{out_f}", "structure": name,
                "hparams": ", ".join(f"{k}={v}" for k, v in layer.hparams().items()),
                "params": layer.num_params(), "flops": layer.flops(1),
                "compression": layer.compression(), "self_check": err,
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["size", "structure", "hparams", "params", "FLOPs/token", "compression", "self-check rel err"]
    body = [[r["size"], r["structure"], r["hparams"], f"{r['params']:,}", f"{r['flops']:,}",
             f"{r['compression']:.1f}x", f"{r['self_check']:.1e}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def draw(names: list[str], n: int, path: str, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        torch.manual_seed(seed)
        layer = build_default(name, n, n)
        with torch.no_grad():
            mag = layer.to_dense().abs().float()
        ax.imshow(mag.numpy(), cmap="magma", interpolation="nearest")
        hp = ", ".join(f"{k}={v}" for k, v in layer.hparams().items())
        ax.set_title(f"{name}\n{hp}\n{layer.compression():.1f}x fewer params", fontsize=7)
    fig.suptitle(f"|to_dense()| of each structure at {n}x{n}", fontsize=11)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from ..core.registry import get, structures

    names = args.structures or sorted(structures(), key=lambda n: (n != "dense", n))
    for name in names:
        get(name)  # unknown names fail here with the list of choices and the closest match
    if args.picture_size < 1:
        raise ValueError(f"--picture-size {args.picture_size}: must be >= 1, e.g. 64")
    rows = rows_for(names, args.sizes, args.seed)
    print(format_table(rows))
    bad = [r for r in rows if not r["self_check"] <= 1e-4]
    if args.png:
        from ..train.results import plots_skipped_reason

        reason = plots_skipped_reason()
        if reason:
            print(f"\npicture skipped ({args.png} not written): {reason}")
        else:
            draw(names, args.picture_size, args.png, args.seed)
            print(f"\nwrote {args.png}")
    if bad:
        print(f"self-check FAILED for: {', '.join(r['structure'] + '@' + r['size'] for r in bad)}",
              file=sys.stderr)
        return 1
    return 0
