"""Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images in 10 classes.

Read from the idx ``.gz`` files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``, or ``$DEFTLY_FASHION_MNIST``) with numpy; parsed arrays are cached.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import MissingDataError, load_cached_npz, save_cached_npz, source_key

__all__ = ["CLASSES", "DEFAULT_DIR", "data_dir", "load", "parse_idx"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_DTYPES: dict[int, np.dtype[Any]] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
                                      0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def data_dir() -> Path:
    return Path(os.environ.get("DEFTLY_FASHION_MNIST", DEFAULT_DIR))


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse one idx file (LeCun's format: magic ``0 0 dtype ndim``, big-endian dims, then data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{name}: not an idx file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"{name}: idx header says shape {dims} ({need} bytes of data) but the file has "
                         f"{len(raw) - header}; the file is truncated or corrupt — reinstall it with "
                         "`apt-get install --reinstall dataset-fashion-mnist`")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _paths(split: str) -> tuple[Path, Path]:
    if split not in FILES:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; use 'train' or 'test'")
    root = data_dir()
    paths = tuple(root / f for f in FILES[split])
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MissingDataError("Fashion-MNIST", "dataset-fashion-mnist (Debian)",
                               "apt-get install -y dataset-fashion-mnist", f"missing {', '.join(missing)}")
    return paths  # type: ignore[return-value]


def load(split: str = "train", limit: int | None = None, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of a split, optionally the first ``limit``."""
    img_path, lab_path = _paths(split)
    key = f"fashion_mnist-{split}-{source_key(img_path, lab_path)}.npz"
    arrays = load_cached_npz(key) if cache else None
    if arrays is None:
        with gzip.open(img_path, "rb") as f:
            images = parse_idx(f.read(), str(img_path))
        with gzip.open(lab_path, "rb") as f:
            labels = parse_idx(f.read(), str(lab_path)).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{img_path} / {lab_path}: images {images.shape} and labels {labels.shape} "
                             "do not pair up; reinstall dataset-fashion-mnist")
        if cache:
            save_cached_npz(key, {"images": images, "labels": labels})
    else:
        images, labels = arrays["images"], arrays["labels"]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def tensors(split: str = "train", limit: int | None = None, flatten: bool = True):
    """Float tensors normalised with the training set's mean/std, and int64 labels."""
    import torch

    images, labels = load(split, limit)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST training-set mean and std of pixel values
    if flatten:
        x = x.reshape(len(x), -1)
    return x, torch.from_numpy(labels)
