"""Save, load and densify structured models — safetensors weights + a JSON description, never pickle.

``deftly.save(model, dir)`` writes two files:

* ``model.safetensors`` — the model's whole ``state_dict`` (tensors shared by several names, such as
  tied embeddings, are stored once and listed as aliases);
* ``deftly.json`` — every structured layer and adapter: module name, structure, hyperparameters, shapes,
  bias, dtype; the deftly and torch versions; the size and SHA-256 of the weights file.

``deftly.load(model, dir)`` takes a fresh instance of the *base* architecture, re-applies the surgery
described in ``deftly.json`` (builds each structured layer / adapter at its name) and loads the weights.
Everything is checked before the model is touched — the files exist, the weights file has the recorded
size and checksum and parses, every structure is known and its hyperparameters are valid, each name is a
linear layer of the right shape, and the weights match the rebuilt model key by key, shape by shape —
so a failed load raises a :class:`DeftlyLoadError` (a ``ValueError``; ``FileNotFoundError`` for missing
files) naming the file, key, expected and found values, and leaves the model unchanged.

A model built on the meta device (``with torch.device("meta")``, accelerate's ``init_empty_weights``) is
materialised by ``load``: every meta tensor is replaced by its saved value (on the CPU). Tensors the file
does not hold (non-persistent buffers such as Hugging Face's ``position_ids``) cannot be materialised, so
``load`` refuses such a model up front, naming them, and leaves it unchanged.

``deftly.densify(model)`` turns every structured layer back into the dense layer it replaced — an
``nn.Linear``, or a Hugging Face ``Conv1D`` with its ``(in, out)`` weight layout (surgery records the
kind; ``deftly.json`` keeps it) — holding ``to_dense()``, and every adapter into its merged base layer.

Hugging Face models: ``deftly.save_pretrained`` / ``deftly.from_pretrained`` (:mod:`deftly.io.hf`) write
and read this same format next to the model's ``config.json``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..core.base import StructuredLinear
from ..core.files import safetensors_torch, sha256_file
from ..core.registry import get, make

__all__ = ["CONFIG_FILE", "FORMAT", "WEIGHTS_FILE", "DeftlyLoadError", "densify", "load", "save"]

CONFIG_FILE = "deftly.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "deftly-model"
FORMAT_VERSION = 1


class DeftlyLoadError(ValueError):
    """A saved deftly model does not match the model or is damaged; the model was left unchanged."""


def _version() -> str:
    from .._version import __version__

    return __version__


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return _dtype_name(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"hyperparameter value {v!r} of type {type(v).__name__} cannot be saved as JSON")


def _from_json(v: Any) -> Any:
    """JSON arrays come back as tuples (hyperparameters such as factor lists are tuples)."""
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------- save
def _entries(model: nn.Module) -> list[dict[str, Any]]:
    from ..surgery.adapters import StructuredAdapter
    from ..surgery.marks import original_kind
    from ..surgery.modules import is_conv1d, structured_modules

    out = []
    for name, mod in structured_modules(model):
        if isinstance(mod, StructuredAdapter):
            d = mod.delta
            out.append({"name": name, "kind": "adapter", "structure": d.name, "hparams": _jsonable(d.hparams()),
                        "in_features": d.in_features, "out_features": d.out_features,
                        "base": "Conv1D" if is_conv1d(mod.base) else type(mod.base).__name__,
                        "scale": mod.scale, "merged": mod.merged, "anchored": mod.anchor is not None,
                        "base_requires_grad": dict(mod.base_requires_grad), "dtype": _dtype_name(d.weight_dtype)})
        else:
            layer = cast(StructuredLinear, mod)  # structured_modules: adapters and structured layers
            out.append({"name": name, "kind": "structured", "structure": layer.name,
                        "hparams": _jsonable(layer.hparams()), "in_features": layer.in_features,
                        "out_features": layer.out_features, "bias": layer.bias is not None,
                        "original_kind": original_kind(layer), "dtype": _dtype_name(layer.weight_dtype)})
    return out


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s weights (safetensors) and its structured layers (JSON) to ``directory``.

    Returns the directory. Files are written atomically (temporary file + rename). No pickle.
    """
    return write(model, directory)


def write(model: nn.Module, directory: str | os.PathLike, *, weights_file: str = WEIGHTS_FILE,
          extra: dict[str, Any] | None = None, who: str = "deftly.save") -> Path:
    """:func:`save` with another weights file name and extra JSON entries in ``deftly.json`` (used by
    :func:`deftly.save_pretrained`)."""
    st = safetensors_torch("deftly.save/load")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{who}: {path} exists and is not a directory")
    meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"{who}: {len(meta)} tensor(s) of the model are on the meta device and hold no values "
                         f"(e.g. {meta[0]!r}); materialise the model (load or initialise its weights) first")
    path.mkdir(parents=True, exist_ok=True)
    entries = _entries(model)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.to("cpu").contiguous().clone() if t.device.type != "cpu" or not t.is_contiguous() \
            else t.contiguous()
    weights = path / weights_file
    _atomic_write(weights, lambda p: st.save_file(tensors, str(p), metadata={"format": FORMAT}))
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "deftly_version": _version(),
              "torch_version": torch.__version__, "model_class": type(model).__name__, "layers": entries,
              "weights": {"file": weights_file, "bytes": weights.stat().st_size, "sha256": sha256_file(weights),
                          "tensors": len(tensors), "aliases": aliases}}
    config.update(extra or {})
    _atomic_write(path / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return path


# ---------------------------------------------------------------------------------------------- load
def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"deftly.load: directory {path} does not exist; save a model there first with "
                                f"deftly.save(model, {str(path)!r})")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"deftly.load: missing {cfg_file} (found: "
                                f"{', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'}); is this a "
                                f"directory written by deftly.save?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeftlyLoadError(f"deftly.load: {cfg_file} is not valid JSON ({err}); the file is damaged or "
                              f"truncated — save the model again") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise DeftlyLoadError(f"deftly.load: {cfg_file} is not a deftly model description (format="
                              f"{cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise DeftlyLoadError(f"deftly.load: {cfg_file} has format_version={cfg.get('format_version')!r}; this "
                              f"deftly {_version()} reads version {FORMAT_VERSION}")
    for key in ("layers", "weights"):
        if key not in cfg:
            raise DeftlyLoadError(f"deftly.load: {cfg_file} has no {key!r} entry; save the model again")
    return cfg


def _read_weights(path: Path, cfg: dict[str, Any]) -> dict[str, Tensor]:
    st = safetensors_torch("deftly.save/load")
    winfo = cfg["weights"]
    wfile = path / winfo.get("file", WEIGHTS_FILE)
    if not wfile.is_file():
        raise FileNotFoundError(f"deftly.load: missing weights file {wfile} (named in {path / CONFIG_FILE})")
    size = wfile.stat().st_size
    if "bytes" in winfo and size != winfo["bytes"]:
        what = "truncated" if size < winfo["bytes"] else "larger than recorded"
        raise DeftlyLoadError(f"deftly.load: weights file {wfile} is {what}: {size} bytes, expected "
                              f"{winfo['bytes']} bytes (recorded in {CONFIG_FILE}); the copy is incomplete or "
                              f"the files come from different saves")
    if "sha256" in winfo:
        digest = sha256_file(wfile)
        if digest != winfo["sha256"]:
            raise DeftlyLoadError(f"deftly.load: weights file {wfile} is corrupt: SHA-256 {digest[:16]}... but "
                                  f"{CONFIG_FILE} records {winfo['sha256'][:16]}...; save the model again")
    from safetensors import SafetensorError

    try:
        tensors = st.load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeftlyLoadError(f"deftly.load: cannot read weights file {wfile}: {err}") from None
    for alias, target in (winfo.get("aliases") or {}).items():
        if target not in tensors:
            raise DeftlyLoadError(f"deftly.load: {CONFIG_FILE} says {alias!r} shares {target!r}, which is "
                                  f"not in {wfile}")
        tensors[alias] = tensors[target]
    return tensors


def _build_entry(model: nn.Module, entry: Any, i: int, cfg_file: Path) -> tuple[str, nn.Module]:
    from ..surgery.adapters import StructuredAdapter
    from ..surgery.marks import ORIGINAL_KINDS
    from ..surgery.modules import is_linear_like, linear_modules, linear_shape

    where = f"{cfg_file}: layers[{i}]"
    if not isinstance(entry, dict):
        raise DeftlyLoadError(f"deftly.load: {where} must be an object, got {entry!r}")
    for key in ("name", "kind", "structure", "hparams", "in_features", "out_features"):
        if key not in entry:
            raise DeftlyLoadError(f"deftly.load: {where} has no {key!r}")
    name, kind, structure = entry["name"], entry["kind"], entry["structure"]
    where = f"{cfg_file}: layer {name!r}"
    try:
        get(structure)
    except (ValueError, TypeError) as err:
        raise DeftlyLoadError(f"deftly.load: {where} uses structure {structure!r}, which this deftly does not "
                              f"know ({err}); install the deftly version that saved it "
                              f"({entry.get('deftly_version', 'see deftly_version')}) or register the "
                              f"structure before loading") from None
    try:
        current = model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in linear_modules(model)]
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        raise DeftlyLoadError(f"deftly.load: {where}: the model ({type(model).__name__}) has no module named "
                              f"{name!r}" + (f"; close names: {', '.join(close)}" if close else "")
                              + ". Pass a fresh instance of the architecture that was saved") from None
    in_f, out_f = entry["in_features"], entry["out_features"]
    if isinstance(current, StructuredAdapter):
        current = current.base
    if isinstance(current, StructuredLinear):
        found = (current.in_features, current.out_features)
    elif is_linear_like(current):
        found = linear_shape(current)
    else:
        raise DeftlyLoadError(f"deftly.load: {where}: the model's module {name!r} is a {type(current).__name__}, "
                              f"expected a linear layer ({in_f} -> {out_f})")
    if found != (in_f, out_f):
        raise DeftlyLoadError(f"deftly.load: {where}: shape mismatch: saved {in_f} -> {out_f}, the model's "
                              f"{type(current).__name__} is {found[0]} -> {found[1]}")
    hp = {k: _from_json(v) for k, v in (entry["hparams"] or {}).items()}
    dtype = getattr(torch, entry.get("dtype", ""), None)
    if not isinstance(dtype, torch.dtype):
        dtype = None
    device = next((t.device for t in current.parameters()), None)
    if device is not None and device.type == "meta":  # a meta-built model: new layers are filled from the file
        device = torch.device("cpu")
    okind = entry.get("original_kind", "Linear")
    if okind not in ORIGINAL_KINDS:
        raise DeftlyLoadError(f"deftly.load: {where}: original_kind={okind!r} is not one of "
                              f"{', '.join(ORIGINAL_KINDS)}")
    try:
        if kind == "structured":
            layer = make(structure, in_f, out_f, bias=bool(entry.get("bias", True)), device=device, dtype=dtype,
                         **hp)
            layer.original_kind = okind
            return name, layer
        if kind == "adapter":
            if isinstance(current, StructuredLinear):
                raise DeftlyLoadError(f"deftly.load: {where}: an adapter needs a dense base layer, the model has "
                                      f"a {type(current).__name__}")
            delta = make(structure, in_f, out_f, bias=False, device=device, dtype=dtype, **hp)
            anchor = (make(structure, in_f, out_f, bias=False, device=device, dtype=dtype, **hp)
                      if entry.get("anchored") else None)
            adapter = StructuredAdapter(current, delta, float(entry.get("scale", 1.0)), anchor=anchor,
                                        freeze_base=False)
            adapter.merged = bool(entry.get("merged", False))
            grads = entry.get("base_requires_grad")
            if isinstance(grads, dict):
                adapter.base_requires_grad = {k: bool(v) for k, v in grads.items()}
            return name, adapter
    except DeftlyLoadError:
        raise
    except (ValueError, TypeError) as err:
        raise DeftlyLoadError(f"deftly.load: {where}: bad hyperparameters {hp} for {structure!r}: {err}") from None
    raise DeftlyLoadError(f"deftly.load: {where}: unknown kind {kind!r}; expected 'structured' or 'adapter'")


def load(model: nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Re-apply the saved surgery to ``model`` (a fresh instance of the base architecture) and load the
    saved weights into it, in place; returns ``model``. Checks everything first: on any error the model
    is unchanged. ``strict``: every weight of the rebuilt model must be in the file and vice versa."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"deftly.load: model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(directory)
    cfg = _read_config(path)
    cfg_file = path / CONFIG_FILE
    if not isinstance(cfg["layers"], list):
        raise DeftlyLoadError(f"deftly.load: {cfg_file}: 'layers' must be a list")
    built = [_build_entry(model, e, i, cfg_file) for i, e in enumerate(cfg["layers"])]
    names = [n for n, _ in built]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DeftlyLoadError(f"deftly.load: {cfg_file} lists {sorted(dup)} more than once")
    tensors = _read_weights(path, cfg)
    # the state dict the rebuilt model will have: current keys outside replaced modules + new layers' keys
    expected: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in names):
            expected[key] = t
    for n, layer in built:
        for key, t in layer.state_dict().items():
            expected[f"{n}.{key}"] = t
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wfile = path / cfg["weights"].get("file", WEIGHTS_FILE)
    if strict and (missing or unexpected):
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) the rebuilt model needs are not in {wfile}: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} weight(s) in {wfile} have no place in the model: {few(unexpected)}")
        raise DeftlyLoadError(f"deftly.load: {cfg_file} and the weights do not match the model "
                              f"({type(model).__name__}; saved from {cfg.get('model_class')}): "
                              + "; ".join(parts) + ". Pass a fresh instance of the saved base architecture")
    for key, t in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(t.shape):
            raise DeftlyLoadError(f"deftly.load: weight {key!r} in {wfile} has shape {tuple(tensors[key].shape)} "
                                  f"but the model expects {tuple(t.shape)} (from {cfg_file})")
        if key in tensors and tensors[key].dtype != t.dtype:
            raise DeftlyLoadError(f"deftly.load: weight {key!r} in {wfile} has dtype {tensors[key].dtype}, the "
                                  f"model expects {t.dtype} (from {cfg_file}); cast the model first "
                                  f"(model.to({tensors[key].dtype})) if that is what you want")
    _check_meta(model, names, built, expected, tensors, wfile)
    # all checks passed: swap the modules and load
    from ..surgery.adapters import StructuredAdapter
    from ..surgery.marks import guard_save_pretrained
    from ..surgery.modules import set_module

    old: list[tuple[str, nn.Module]] = []
    filled: list[tuple[dict, str, Tensor]] = []
    try:
        for n, layer in built:
            old.append((n, set_module(model, n, layer)))
            if isinstance(layer, StructuredAdapter):
                for prm in layer.base.parameters():
                    prm.requires_grad_(False)
        _materialise_meta(model, tensors, filled)
        model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)
    except Exception:
        for slots, key, t in reversed(filled):
            slots[key] = t
        for n, mod in reversed(old):
            set_module(model, n, mod)
        raise
    if built:
        guard_save_pretrained(model)  # transformers' own save_pretrained would lose the structure
    return model


def _check_meta(model: nn.Module, names: list[str], built: list[tuple[str, nn.Module]],
                expected: dict[str, Tensor], tensors: dict[str, Tensor], wfile: Path) -> None:
    """Refuse (before anything changes) a meta-device model whose meta tensors the file cannot fill."""
    def replaced(key: str) -> bool:
        return any(key.startswith(n + ".") for n in names)

    empty = [k for k, t in expected.items() if t.is_meta and k not in tensors]
    persistent = set(model.state_dict())
    empty += [k for k, b in model.named_buffers(remove_duplicate=False)
              if b.is_meta and k not in persistent and not replaced(k)]
    for n, layer in built:
        keys = set(layer.state_dict())
        empty += [f"{n}.{k}" for k, b in layer.named_buffers(remove_duplicate=False) if b.is_meta and k not in keys]
    if empty:
        shown = ", ".join(empty[:6]) + (f" ... ({len(empty) - 6} more)" if len(empty) > 6 else "")
        raise DeftlyLoadError(f"deftly.load: the model ({type(model).__name__}) has tensors on the meta device "
                              f"that {wfile} cannot fill: {shown} (non-persistent buffers are never saved). "
                              f"Build the model on a real device, or with its buffers materialised (accelerate's "
                              f"init_empty_weights(include_buffers=False)); the model was not changed")


def _materialise_meta(model: nn.Module, tensors: dict[str, Tensor], filled: list) -> None:
    """Replace every meta parameter / buffer by its saved tensor (tied ones stay tied); ``filled`` records
    ``(slots, name, old)`` so that a failure can put the meta tensors back."""
    new: dict[int, Tensor] = {}
    used: set[int] = set()
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for slots, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for key, t in list(slots.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in new:
                    src = tensors[f"{prefix}.{key}" if prefix else key]
                    src = src.clone() if id(src) in used else src  # tied in the file, not in the model
                    used.add(id(src))
                    new[id(t)] = nn.Parameter(src, requires_grad=t.requires_grad) if is_param else src
                filled.append((slots, key, t))
                slots[key] = new[id(t)]


# ---------------------------------------------------------------------------------------------- densify
def densify(model: nn.Module) -> nn.Module:
    """Replace every structured layer by the dense layer it replaced — ``nn.Linear``, or a Hugging Face
    ``Conv1D`` (weight stored ``(in, out)``) when surgery replaced one — holding ``to_dense()`` and the
    bias, and every adapter by its merged base layer; in place, returns ``model``. The forward is
    unchanged up to rounding; a frozen structured layer gives a frozen dense one. Every layer is built
    before the first swap: an error leaves the model unchanged."""
    from ..surgery.adapters import StructuredAdapter
    from ..surgery.marks import original_kind
    from ..surgery.modules import set_module, structured_modules

    new: list[tuple[str, nn.Module]] = []
    for name, mod in structured_modules(model):
        if isinstance(mod, StructuredAdapter):
            new.append((name, mod.merged_linear()))
            continue
        layer = cast(StructuredLinear, mod)  # structured_modules: adapters and structured layers
        kind = original_kind(layer)
        with torch.no_grad():
            W = layer.to_dense()
            if W.is_complex():
                who = layer.name or type(layer).__name__
                raise ValueError(f"deftly.densify: layer {name!r} ({who}) has a complex weight; a dense "
                                 f"{kind} cannot hold it")
            b = layer.bias.detach() if layer.bias is not None else None
            dense = _conv1d(name, W, b) if kind == "Conv1D" else _linear(W, b)
        dense.requires_grad_(any(p.requires_grad for p in mod.parameters()))
        dense.train(mod.training)
        new.append((name, dense))
    for name, dense in new:
        set_module(model, name, dense)
    return model


def _linear(W: Tensor, b: Tensor | None) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta", dtype=W.dtype)
    lin.to_empty(device=W.device)
    lin.weight.copy_(W)
    if b is not None:
        lin.bias.copy_(b)
    return lin


def _conv1d(name: str, W: Tensor, b: Tensor | None) -> nn.Module:
    """A Hugging Face ``Conv1D`` computing ``x @ W.T + b`` (its weight is ``W.T``, ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        raise ImportError(f"deftly.densify: layer {name!r} replaced a Hugging Face Conv1D; rebuilding it needs "
                          f"transformers (pip install transformers)") from None
    with torch.device("meta"):
        conv = Conv1D(W.shape[0], W.shape[1])  # nf = out, nx = in
    conv.to_empty(device=W.device)
    conv.to(W.dtype)
    conv.weight.copy_(W.T)
    if b is not None:
        conv.bias.copy_(b)
    else:
        conv.bias.zero_()
    return conv
