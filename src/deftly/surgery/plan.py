"""``deftly.plan``: what structurizing a model would save — parameters, FLOPs per token and weight memory,
per kind of layer and in total — without weights: the model is built (or copied) on the meta device.

>>> p = deftly.plan("llama-7b", deftly.StructureConfig(structure="monarch", budget=0.25))
>>> print(p)                       # per kind (q_proj, ..., down_proj), totals, fp32/bf16 memory

``model_or_config`` is a preset name (:data:`PRESETS`: ``llama-7b``, ``gpt2-xl``, ``bert-base``), a path
to a Hugging Face ``config.json`` or a model directory holding one, a ``transformers.PretrainedConfig``,
or an ``nn.Module`` (copied to the meta device with its parameters and buffers replaced by meta tensors:
the argument is never changed and its weights are never copied). A config is instantiated with
``transformers`` on the meta device, as ``config.architectures[0]`` when set (presets: the usual LM
heads) and as the base ``AutoModel`` otherwise. No network access, no weight download, no allocation.

The copy is then :func:`deftly.structurize` d with ``init="random"`` on the meta device, so the layers and
hyperparameters are exactly those a real ``structurize`` with the same config chooses (``select="params"``;
``select="error"`` needs the weights and is refused).

**Counts.** Every parameter is counted once (tied weights, e.g. GPT-2's ``lm_head`` = ``wte``, belong to
the module that registers them first); the rows add up to ``sum(p.numel() for p in model.parameters())``.
Layers are grouped by *kind*: the module name after its last numeric part (``model.layers.3.mlp.up_proj``
-> ``mlp.up_proj``). **FLOPs per token** are those of the linear layers (2 x multiply-adds, the
convention of ``torch.utils.flop_counter``; structured layers: ``layer.flops()``), the head included;
attention scores (which grow with the context) and elementwise ops are not counted. **Weight memory**
is parameters x 4 bytes (fp32) or x 2 (bf16), in GiB.

**Speed-up** (``speed=Latency(rows=...)``): per kind, the time of one call of its linear layers, dense
(``nn.Linear``) / as planned, at ``speed.rows`` rows per call, *measured on this machine* (fresh real
layers from :func:`deftly.make`, timed against ``nn.Linear`` interleaved; the timings are those of
:func:`deftly.surgery.latency.layer_speedup`, cached in ``$DEFTLY_CACHE/latency.json`` with the latency
budgets'); layers left dense count their dense time on both sides. The total is the expected speed-up of
all linear layers (the head included): sum of dense times / sum of planned times. It is not a prediction
for other hardware, nor for the whole model (attention, norms and embeddings are not timed).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import StructureConfig
from .latency import Candidate, Latency, _key, _machine, layer_speedup, progress
from .modules import is_conv1d, linear_modules, linear_shape
from .report import _fmt_hp
from .structurize import structurize

__all__ = ["PRESETS", "Plan", "PlanRow", "meta_model", "plan"]

#: name -> (transformers config class, its arguments, model class): sizes from the published configs
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama-7b": ("LlamaConfig", {}, "LlamaForCausalLM"),  # LlamaConfig's defaults are Llama(-2)-7B
    "gpt2-xl": ("GPT2Config", {"n_embd": 1600, "n_layer": 48, "n_head": 25}, "GPT2LMHeadModel"),
    "bert-base": ("BertConfig", {}, "BertForMaskedLM"),  # BertConfig's defaults are bert-base-uncased
}

_GIB = float(1 << 30)


@dataclass
class PlanRow:
    """One kind of layer (or the rest of the model): counts before and after structurizing."""

    kind: str
    layers: int
    shape: str
    structure: str
    hparams: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    #: with ``plan(speed=...)``: seconds of one call of every layer of the row (``speed.rows`` rows),
    #: dense and as planned (a layer left dense: its dense time); ``None`` without timings
    dense_seconds: float | None = None
    planned_seconds: float | None = None

    @property
    def speedup(self) -> float | None:
        """Dense time / planned time of the row's linear layers on this machine (``None``: not timed)."""
        return _ratio(self.dense_seconds, self.planned_seconds)


def _ratio(dense: float | None, planned: float | None) -> float | None:
    return None if dense is None or not planned else dense / planned


_SPEED_FIELDS = ("dense_seconds", "planned_seconds")


@dataclass
class Plan:
    """The result of :func:`plan`: rows per kind of layer, totals, memory; ``str()`` is a table,
    :meth:`to_markdown` a Markdown one, :meth:`to_dict` JSON-able. ``model`` is the structurized copy on
    the meta device (``to_empty(device=...)`` + ``reset_parameters()`` makes it real). ``speed``: how
    the speed-up was timed (``None``: not asked for)."""

    source: str
    config: StructureConfig
    rows: list[PlanRow]
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)
    speed: Latency | None = None

    def _timed_sum(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.rows if r.layers]
        return None if self.speed is None or None in values else sum(values)

    @property
    def dense_seconds(self) -> float | None:
        """Seconds of one call of every linear layer, all dense (``None``: not timed)."""
        return self._timed_sum("dense_seconds")

    @property
    def planned_seconds(self) -> float | None:
        """Seconds of one call of every linear layer as planned (``None``: not timed)."""
        return self._timed_sum("planned_seconds")

    @property
    def speedup(self) -> float | None:
        """The expected speed-up of the linear layers on this machine: dense seconds / planned seconds."""
        return _ratio(self.dense_seconds, self.planned_seconds)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def flops_before(self) -> int:
        return sum(r.flops_before for r in self.rows)

    @property
    def flops_after(self) -> int:
        return sum(r.flops_after for r in self.rows)

    def memory(self, bytes_per_param: int) -> tuple[float, float]:
        """Weight memory in GiB ``(before, after)`` at ``bytes_per_param`` (4: fp32, 2: bf16)."""
        return (self.params_before * bytes_per_param / _GIB, self.params_after * bytes_per_param / _GIB)

    def to_dict(self) -> dict[str, Any]:
        rows = [dataclasses.asdict(r) for r in self.rows]
        totals = {"params_before": self.params_before, "params_after": self.params_after,
                  "flops_before": self.flops_before, "flops_after": self.flops_after,
                  "fp32_gib": self.memory(4), "bf16_gib": self.memory(2)}
        out = {"source": self.source, "config": self.config.to_dict(), "seconds": self.seconds, "rows": rows,
               "totals": totals}
        if self.speed is None:
            for row in rows:
                for name in _SPEED_FIELDS:
                    del row[name]
            return out
        for row, r in zip(rows, self.rows):
            row["speedup"] = r.speedup
        totals.update(dense_seconds=self.dense_seconds, planned_seconds=self.planned_seconds,
                      speedup=self.speedup)
        out["speed"] = {"rows": self.speed.rows, "dtype": str(self.speed.dtype), "mode": self.speed.mode,
                        "seconds": self.speed.seconds, "machine": _machine()}
        return out

    def _speed_column(self) -> str:
        assert self.speed is not None
        return f"speed-up (linear, {self.speed.rows} rows)"

    def _table(self) -> tuple[list[str], list[list[str]], list[list[str]]]:
        head = ["kind", "layers", "shape (out x in)", "structure", "hparams", "params before", "params after",
                "FLOPs/token before", "FLOPs/token after"]

        def ratio(a: int, b: int) -> str:
            return f" ({a / b:.3f}x)" if b and a != b else ""

        body = [[r.kind, str(r.layers) if r.layers else "-", r.shape, r.structure, r.hparams,
                 f"{r.params_before:,}", f"{r.params_after:,}" + ratio(r.params_after, r.params_before),
                 f"{r.flops_before:,}" if r.flops_before else "-",
                 (f"{r.flops_after:,}" + ratio(r.flops_after, r.flops_before)) if r.flops_before else "-"]
                for r in self.rows]
        saved = self.params_before - self.params_after
        total = ["TOTAL", str(sum(r.layers for r in self.rows)), "", "", "",
                 f"{self.params_before:,}", f"{self.params_after:,}" + ratio(self.params_after, self.params_before),
                 f"{self.flops_before:,}", f"{self.flops_after:,}" + ratio(self.flops_after, self.flops_before)]
        mem = []
        for label, nbytes in (("weights fp32 (GiB)", 4), ("weights bf16 (GiB)", 2)):
            before, after = self.memory(nbytes)
            mem.append([label, "", "", "", f"saved {before - after:.2f} GiB", f"{before:.2f}", f"{after:.2f}",
                        "", ""])
        mem.append(["params saved", "", "", "", "", "", f"{saved:,} ({saved / max(self.params_before, 1):.1%})",
                    "", ""])
        if self.speed is not None:
            def speed(r: PlanRow | Plan) -> str:
                x = r.speedup
                return "not timed" if x is None else f"{x:.2f}x"

            head.append(self._speed_column())
            for line, r in zip(body, self.rows):
                line.append(speed(r) if r.layers else "")
            total.append(speed(self))
            for line in mem:
                line.append("")
        return head, body, [total, *mem]

    def title(self) -> str:
        c = self.config
        budget = f", budget {c.budget} of {c.budget_kind}" if c.budget is not None else ", default hparams"
        structure = ",".join(c.candidates) if c.candidates else c.structure
        speed = ""
        if self.speed is not None:
            x = self.speedup
            speed = (f"; {self._speed_column()}: dense / planned time of the linear layers, "
                     f"{str(self.speed.dtype).replace('torch.', '')} {self.speed.mode}, measured on this "
                     f"machine, not a prediction for other hardware; expected speed-up of the linear layers: "
                     + ("not timed" if x is None else f"{x:.2f}x"))
        return f"deftly plan: {self.source} -> {structure}{budget} (planned on the meta device in " \
               f"{self.seconds:.1f} s; FLOPs/token: linear layers only{speed})"

    def __str__(self) -> str:
        head, body, totals = self._table()
        rows = [head, *body, *totals]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

        def line(r: list[str]) -> str:
            return "  ".join(c.rjust(w) if i >= 5 or i == 1 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        sep = "  ".join("-" * w for w in widths)
        return "\n".join([self.title(), line(head), sep, *map(line, body), sep, *map(line, totals)])

    def to_markdown(self) -> str:
        head, body, totals = self._table()
        out = ["| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i in (0, 2, 3, 4) else "---:" for i in range(len(head))) + "|"]
        for r in body + [[f"**{c}**" if c else c for c in t] for t in totals]:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        return "\n".join(out)


# ------------------------------------------------------------------------------------------ models
def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise ImportError("deftly.plan needs the `transformers` package to build a model from a config; "
                          "pip install transformers, or pass an nn.Module") from err
    return transformers


def _config_from_file(path: Path):
    tf = _transformers()
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read a Hugging Face config from {str(path)!r}: {err}") from None
    model_type = d.get("model_type") if isinstance(d, dict) else None
    if not model_type:
        raise ValueError(f"{str(path)!r} has no 'model_type': it is not a Hugging Face config.json")
    try:
        cls = tf.CONFIG_MAPPING[model_type]
    except KeyError:
        close = difflib.get_close_matches(model_type, list(tf.CONFIG_MAPPING.keys()), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{str(path)!r}: model_type={model_type!r} is unknown to transformers "
                         f"{tf.__version__}{hint}") from None
    return cls.from_dict(d)


def _resolve_config(source: Any) -> tuple[Any, str]:
    """``(transformers config, description)`` for a preset name, a path or a config object (names and
    paths are checked before transformers is imported: a typo fails at once)."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if text in PRESETS:
            cfg_name, kwargs, arch = PRESETS[text]
            cfg = getattr(_transformers(), cfg_name)(**kwargs)
            cfg.architectures = [arch]
            return cfg, text
        path = Path(text).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"model directory {text!r} has no config.json")
            path = path / "config.json"
        if path.is_file():
            return _config_from_file(path), text
        close = difflib.get_close_matches(text, list(PRESETS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {text!r}: not a preset ({', '.join(PRESETS)}) nor a path to a "
                         f"config.json or a model directory.{hint}")
    tf = _transformers()
    if isinstance(source, tf.PretrainedConfig):
        return source, type(source).__name__
    raise TypeError(f"plan: model_or_config must be an nn.Module, a preset name ({', '.join(PRESETS)}), a "
                    f"path to a config.json / model directory or a transformers config, got "
                    f"{type(source).__name__}")


def _model_class(tf, config):
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None:
            return cls
    return tf.AutoModel


def meta_model(model_or_config: Any) -> tuple[nn.Module, str]:
    """``(model on the meta device, description)``; an ``nn.Module`` argument is copied, never changed."""
    if isinstance(model_or_config, nn.Module):
        src = model_or_config
        memo: dict[int, Any] = {}
        for p in src.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in src.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        return copy.deepcopy(src, memo), type(src).__name__
    config, desc = _resolve_config(model_or_config)
    tf = _transformers()
    cls = _model_class(tf, config)
    with torch.device("meta"):
        model = cls.from_config(config) if cls is tf.AutoModel else cls(config)
    return model, desc


# ------------------------------------------------------------------------------------------ counting
def _kind(name: str) -> str:
    """The name after its last numeric part: ``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1:]) if idx and idx[-1] + 1 < len(parts) else name


def _owners(model: nn.Module, units: list[str]) -> dict[str, int]:
    """Parameters per unit (a module name; ``""`` collects the rest), each parameter counted once."""
    counts = {u: 0 for u in units}
    counts[""] = 0
    by_len = sorted(units, key=len, reverse=True)
    for name, p in model.named_parameters():  # deduplicated: a tied weight is listed once
        unit = next((u for u in by_len if name.startswith(u + ".")), "")
        counts[unit] += p.numel()
    return counts


def _check_config(config: Any) -> StructureConfig:
    if not isinstance(config, StructureConfig):
        raise TypeError(f"plan: config must be a deftly.StructureConfig, got {type(config).__name__}")
    if config.select == "error":
        raise ValueError("plan: select='error' ranks candidates by their projection error, which needs the "
                         "weights; plan counts the select='params' choice (the largest within the budget)")
    return dataclasses.replace(config, init="random", calibration=None)


def _times(layers: list[tuple[str, int, int, dict[str, Any], bool]], speed: Latency, measure: bool,
           memo: dict[str, Candidate | None]) -> tuple[float | None, float | None]:
    """``(dense, planned)`` seconds of one call of each ``(structure, in, out, hparams, planned)`` layer
    (a layer left dense: ``("dense", in, out, {}, False)``, its dense time on both sides)."""
    dense = planned = 0.0
    for structure, in_f, out_f, hp, structured in layers:
        key = _key(structure, in_f, out_f, hp, speed)  # layers of one shape are looked up once
        if key not in memo:
            memo[key] = layer_speedup(structure, in_f, out_f, hp, speed, measure=measure, log=progress)
        c = memo[key]
        if c is None:
            return None, None
        dense += c.dense_seconds
        planned += c.seconds if structured else c.dense_seconds
    return dense, planned


def plan(model_or_config: Any, config: StructureConfig, *, speed: Latency | None = None,
         measure: bool = True) -> Plan:
    """Parameters, FLOPs per token and weight memory of ``model_or_config`` before and after
    ``structurize(model, config)``, per kind of layer; built on the meta device (see the module doc).

    ``speed``: also time each kind's linear layers, dense and as planned, at ``speed.rows`` rows per call
    on this machine (cached; ``measure=False`` uses only cached timings and leaves the others out)."""
    t0 = time.perf_counter()
    cfg = _check_config(config)
    if speed is not None and not isinstance(speed, Latency):
        raise TypeError(f"plan: speed must be a deftly.surgery.latency.Latency (e.g. Latency(rows=4096)) or "
                        f"None, got {type(speed).__name__}")
    model, desc = meta_model(model_or_config)
    linear = linear_modules(model)
    kinds = {n: _kind(n) for n, _ in linear}
    shapes = {n: linear_shape(m) for n, m in linear}
    before = _owners(model, [n for n, _ in linear])
    report = structurize(model, cfg)
    after = _owners(model, [n for n, _ in linear])
    done = {r.name: r for r in report.layers}
    rows: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, mod in linear:
        in_f, out_f = shapes[name]
        r = done.get(name)
        key = (kinds[name], r is not None)
        row = rows.setdefault(key, {"names": [], "shapes": set(), "structures": set(), "hparams": set(),
                                    "pb": 0, "pa": 0, "fb": 0, "fa": 0, "conv1d": is_conv1d(mod), "timed": []})
        row["timed"].append((r.structure, in_f, out_f, r.hparams, True) if r else ("dense", in_f, out_f, {}, False))
        row["names"].append(name)
        row["shapes"].add(f"{out_f} x {in_f}")
        row["structures"].add(r.structure if r else "dense (not targeted)")
        row["hparams"].add(_fmt_hp(r.hparams) if r else "-")
        row["pb"] += before[name]
        row["pa"] += after[name]
        row["fb"] += 2 * in_f * out_f
        row["fa"] += r.flops_after if r else 2 * in_f * out_f

    def one(values: set[str]) -> str:
        return next(iter(values)) if len(values) == 1 else f"mixed ({len(values)})"

    memo: dict[str, Candidate | None] = {}
    out = [PlanRow(kind=k + (" [Conv1D]" if v["conv1d"] else ""), layers=len(v["names"]),
                   shape=one(v["shapes"]), structure=one(v["structures"]), hparams=one(v["hparams"]),
                   params_before=v["pb"], params_after=v["pa"], flops_before=v["fb"], flops_after=v["fa"])
           for (k, _), v in rows.items()]  # in model order
    if speed is not None:
        for row_out, v in zip(out, rows.values()):
            row_out.dense_seconds, row_out.planned_seconds = _times(v["timed"], speed, measure, memo)
    out.append(PlanRow(kind="other (embeddings, norms, ...)", layers=0, shape="", structure="unchanged",
                       hparams="", params_before=before[""], params_after=after[""], flops_before=0,
                       flops_after=0))
    return Plan(source=desc, config=config, rows=out, seconds=time.perf_counter() - t0, model=model, speed=speed)
