"""Per-layer and whole-model reports of surgery (printed as tables)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LayerReport", "SurgeryReport"]


@dataclass
class LayerReport:
    """One replaced layer. Counts include the bias; FLOPs are per input row (token)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    structure: str
    hparams: dict[str, Any]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    error: float | None = None
    output_error: float | None = None
    plain_output_error: float | None = None
    method: str = ""
    seconds: float = 0.0


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_hp(hp: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"


def _fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class SurgeryReport:
    """What :func:`structurize` (or :func:`deftly.adapt`) did: per layer and totals.

    ``str(report)`` is a plain-text table, :meth:`to_markdown` a Markdown one, :meth:`to_dict` JSON-able.
    """

    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    structure: str = ""
    budget: float | None = None
    budget_kind: str = "params"
    action: str = "structurize"
    trainable_params: int | None = None

    # ---- totals
    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.layers)

    @property
    def mean_error(self) -> float | None:
        return _mean(r.error for r in self.layers)

    @property
    def mean_output_error(self) -> float | None:
        return _mean(r.output_error for r in self.layers)

    @property
    def mean_plain_output_error(self) -> float | None:
        return _mean(r.plain_output_error for r in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no replaced layer named {name!r}; replaced: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "structure": self.structure, "budget": self.budget,
                "budget_kind": self.budget_kind, "layers": [asdict(r) for r in self.layers],
                "totals": {"params_before": self.params_before, "params_after": self.params_after,
                           "flops_before": self.flops_before, "flops_after": self.flops_after,
                           "model_params_before": self.model_params_before,
                           "model_params_after": self.model_params_after, "mean_error": self.mean_error,
                           "mean_output_error": self.mean_output_error,
                           "mean_plain_output_error": self.mean_plain_output_error,
                           "trainable_params": self.trainable_params}}

    def _rows(self) -> tuple[list[str], list[list[str]], list[list[str]]]:
        calibrated = any(r.output_error is not None for r in self.layers)
        projected = any(r.error is not None for r in self.layers)
        head = ["layer", "shape (out x in)", "structure", "hparams", "params before", "params after",
                "FLOPs/token before", "FLOPs/token after", "weight error"]
        if calibrated:
            head += ["output error", "output error (plain proj.)"]
        rows = []
        for r in self.layers:
            row = [r.name + (" [Conv1D]" if r.kind == "Conv1D" else ""), f"{r.out_features} x {r.in_features}",
                   r.structure, _fmt_hp(r.hparams), _fmt_int(r.params_before), _fmt_int(r.params_after),
                   _fmt_int(r.flops_before), _fmt_int(r.flops_after), _fmt_err(r.error)]
            if calibrated:
                row += [_fmt_err(r.output_error), _fmt_err(r.plain_output_error)]
            rows.append(row)

        def ratio(a: int, b: int) -> str:
            return f" ({a / b:.3f}x)" if b else ""

        n = len(head)
        tot = ["TOTAL targeted layers", f"{len(self.layers)} layers", self.structure, "-",
               _fmt_int(self.params_before), _fmt_int(self.params_after) + ratio(self.params_after,
                                                                                   self.params_before),
               _fmt_int(self.flops_before), _fmt_int(self.flops_after) + ratio(self.flops_after,
                                                                              self.flops_before),
               _fmt_err(self.mean_error) + (" (mean)" if self.mean_error is not None else "")]
        if calibrated:
            tot += [_fmt_err(self.mean_output_error) + " (mean)", _fmt_err(self.mean_plain_output_error)
                    + " (mean)"]
        whole = ["TOTAL whole model", "incl. embeddings", "", "", _fmt_int(self.model_params_before),
                 _fmt_int(self.model_params_after) + ratio(self.model_params_after, self.model_params_before),
                 "", "", ""] + ([""] * (n - 9))
        if not projected:  # adapters / random init: no error columns
            keep = len(head) - (3 if calibrated else 1)
            head, rows = head[:keep], [r[:keep] for r in rows]
            tot, whole = tot[:keep], whole[:keep]
        return head, rows, [tot, whole]

    def __str__(self) -> str:
        head, rows, totals = self._rows()
        allrows = [head] + rows + totals
        widths = [max(len(r[i]) for r in allrows) for i in range(len(head))]
        numeric = set(range(4, len(head)))

        def line(r: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths))).rstrip()

        sep = "  ".join("-" * w for w in widths)
        title = f"deftly {self.action}: {self.structure}" + (
            f", budget {self.budget} of {self.budget_kind}" if self.budget is not None else "")
        extra = (f"\ntrainable parameters: {self.trainable_params:,}" if self.trainable_params is not None
                 else "")
        return "\n".join([title, line(head), sep] + [line(r) for r in rows] + [sep]
                         + [line(r) for r in totals]) + extra

    def to_markdown(self) -> str:
        head, rows, totals = self._rows()
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 4 else "---:" for i in
                                                             range(len(head))) + "|"]
        for r in rows + [[f"**{c}**" if c else c for c in t] for t in totals]:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"SurgeryReport({self.action}, {self.structure}, {len(self.layers)} layers, params "
                f"{self.params_before:,} -> {self.params_after:,}, model {self.model_params_before:,} -> "
                f"{self.model_params_after:,})")
