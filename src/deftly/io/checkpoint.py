"""Atomic, verified checkpoints of nested training state: tensors in safetensors, structure in JSON.

``save_checkpoint(path, state)`` stores a nested ``dict``/``list``/``tuple`` of tensors and JSON-able
values (``None``, ``bool``, ``int``, ``float`` incl. ``inf``/``nan``, ``str``) — model and optimizer
state dicts, RNG states, step counters, configs — as ONE safetensors file: every tensor under a path-like
key, and the structure (with references to those keys, non-string dict keys and tuples preserved) as JSON
in the header's ``__metadata__``, together with a SHA-256 of all tensor bytes. The file is written to a
temporary file in the same folder, fsync'ed and moved over ``path`` with ``os.replace``, so a killed
writer never leaves a half-written checkpoint behind. ``load_checkpoint(path)`` checks the header, the
sizes and the checksum and raises :class:`CheckpointError` naming the file on any mismatch. No pickle is
involved at any point.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..core.files import atomic_write_bytes, safetensors_torch

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "deftly-checkpoint/1"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_FLOAT = "__float__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a deftly checkpoint."""


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = key or "root"
        if name in tensors:  # pragma: no cover - keys are unique paths
            raise ValueError(f"duplicate tensor key {name!r}")
        t = obj.detach().to("cpu")
        tensors[name] = t.contiguous().clone()  # clone: safetensors refuses tensors sharing storage
        return {_TENSOR: name}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS, _FLOAT} & set(obj)):
            return {k: _encode(v, f"{key}/{k}" if key else k, tensors) for k, v in obj.items()}
        items = []
        for _i, (k, v) in enumerate(obj.items()):
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"save_checkpoint: dict key {k!r} at {key or '<root>'} has type "
                                f"{type(k).__name__}; use str/int/float/bool keys")
            items.append([k, _encode(v, f"{key}/{k}" if key else str(k), tensors)])
        return {_ITEMS: items}
    if isinstance(obj, (list, tuple)):
        enc = [_encode(v, f"{key}/{i}" if key else str(i), tensors) for i, v in enumerate(obj)]
        return {_TUPLE: enc} if isinstance(obj, tuple) else enc
    try:  # numpy scalars and arrays
        import numpy as np

        if isinstance(obj, np.generic):
            return _encode(obj.item(), key, tensors)
        if isinstance(obj, np.ndarray):
            return _encode(torch.from_numpy(np.ascontiguousarray(obj)), key, tensors)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"save_checkpoint: value at {key or '<root>'} has type {type(obj).__name__}, which a "
                    "checkpoint cannot store; use tensors, numbers, strings, None, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            name = obj[_TENSOR]
            if name not in tensors:
                raise CheckpointError(f"{where}: the structure refers to tensor {name!r}, which the file "
                                      "lacks; the checkpoint is corrupt")
            return tensors[name]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors, where) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors, where) for k, v in obj[_ITEMS]}
        if _FLOAT in obj:
            return float(obj[_FLOAT])
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    return obj


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + ``os.replace``); returns the path."""
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    meta = {"format": FORMAT, "structure": json.dumps(structure, allow_nan=False),
            "sha256": _digest(tensors)}
    blob = safetensors_torch().save(tensors, metadata=meta)
    path = Path(path)
    atomic_write_bytes(path, blob)
    return path


def _read_header(raw: bytes, where: str) -> dict:
    if len(raw) < 8:
        raise CheckpointError(f"{where}: file is {len(raw)} bytes long, too short for a checkpoint; it is "
                              "truncated or not a checkpoint")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise CheckpointError(f"{where}: header claims {n} bytes but the file has {len(raw) - 8} after the "
                              "length field; the file is truncated or corrupt")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: unreadable header ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object; the file is corrupt")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a deftly checkpoint (format {meta.get('format')!r}, expected "
                              f"{FORMAT!r}); a plain safetensors file loads with safetensors.torch.load_file")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != len(raw):
        raise CheckpointError(f"{where}: tensor data should be {end} bytes but the file holds "
                              f"{len(raw) - 8 - n}; the file is truncated or corrupt")
    return meta


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = None) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; tensors land on ``map_location``
    (CPU by default). Raises ``FileNotFoundError`` or :class:`CheckpointError` naming the file."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {where} does not exist")
    raw = path.read_bytes()
    meta = _read_header(raw, where)
    try:
        tensors = safetensors_torch().load(raw)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{where}: tensor data is unreadable ({err}); the file is corrupt") from None
    if _digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{where}: checksum mismatch — the tensor bytes changed after writing; the "
                              "file is corrupt (delete it to start over, or use an older checkpoint)")
    try:
        structure = json.loads(meta["structure"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: unreadable structure ({err}); the file is corrupt") from None
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = _decode(structure, tensors, where)
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: top level is {type(state).__name__}, not a dict; the file is corrupt")
    return state
