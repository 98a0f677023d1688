"""~3 MB of English Wikipedia text, cleaned of markup, for character-level language models and as a
sentence source for distillation.

The text is the first pages of an English Wikipedia dump shipped in ``gensim``'s test data
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), read with
``gensim.corpora.wikicorpus.extract_pages`` and cleaned with ``filter_wiki``; leftover bold/italic quotes
(``'''``, ``''``) and heading marks (``==``) are stripped, redirects dropped and blank runs collapsed.
The cleaned text is cached as UTF-8 under ``~/.cache/deftly``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import MissingDataError, atomic_write_bytes, cache_dir, source_key

__all__ = ["FILE", "CharVocab", "articles", "char_splits", "sentences", "text"]

FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_VERSION = 1  # bump when the cleaning changes


def _source_path() -> str:
    try:
        from gensim.test.utils import datapath
    except ImportError as err:
        raise MissingDataError("The Wikipedia text (gensim test data)", "gensim", "pip install gensim",
                               str(err)) from None
    import os

    path = datapath(FILE)
    if not os.path.exists(path):
        raise MissingDataError("The Wikipedia text (gensim test data)", "gensim",
                               "pip install --force-reinstall gensim", f"missing {path}")
    return path


def clean(markup: str) -> str:
    """``filter_wiki`` and then strip the quote/heading marks it leaves; collapse blank runs."""
    from gensim.corpora.wikicorpus import filter_wiki

    t = filter_wiki(markup)
    t = t.replace("'''", "").replace("''", "").replace("==", "")
    t = re.sub(r"[ \t]+\n", "\n", t)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


def articles() -> list[tuple[str, str]]:
    """``(title, cleaned text)`` of every non-redirect article, in dump order."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.open(_source_path(), "rb") as f:
        for title, markup, _pageid in extract_pages(f):
            body = clean(markup)
            if not body or body.upper().startswith("#REDIRECT"):
                continue
            out.append((title, body))
    return out


def text(cache: bool = True) -> str:
    """All articles' cleaned text joined by blank lines (about 3.1 million characters)."""
    path = _source_path()
    cached = cache_dir() / f"wikipedia-{source_key(path, extra=_VERSION)}.txt"
    if cache and cached.exists():
        return cached.read_text(encoding="utf-8")
    body = "\n\n".join(t for _, t in articles())
    if cache:
        try:
            atomic_write_bytes(cached, body.encode("utf-8"))
        except OSError:
            pass
    return body


@dataclass
class CharVocab:
    """Characters seen at least ``min_count`` times, plus index 0 for every rarer character."""

    chars: str
    unk: str = "\u2047"  # shown for out-of-vocabulary characters when decoding

    @classmethod
    def build(cls, corpus: str, min_count: int = 5) -> CharVocab:
        from collections import Counter

        counts = Counter(corpus)
        keep = sorted(c for c, n in counts.items() if n >= min_count)
        return cls("".join(keep))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, s: str) -> np.ndarray:
        table = {c: i + 1 for i, c in enumerate(self.chars)}
        return np.fromiter((table.get(c, 0) for c in s), dtype=np.int64, count=len(s))

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if i > 0 else self.unk for i in (int(j) for j in ids))


def char_splits(val_fraction: float = 0.1, min_count: int = 5, limit: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, CharVocab]:
    """``(train ids, val ids, vocab)``: the text split by position, the last ``val_fraction`` for
    validation (articles are not shuffled, so validation text is unseen). ``limit`` keeps the first
    ``limit`` characters (for tests)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1), e.g. 0.1")
    corpus = text()
    if limit is not None:
        corpus = corpus[:limit]
    vocab = CharVocab.build(corpus, min_count)
    ids = vocab.encode(corpus)
    cut = int(len(ids) * (1.0 - val_fraction))
    return ids[:cut], ids[cut:], vocab


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def sentences(min_chars: int = 40, max_chars: int = 300, limit: int | None = None) -> list[str]:
    """Prose sentences of the text (lines that are paragraphs, split after ``.``/``!``/``?``), between
    ``min_chars`` and ``max_chars`` long, with at least 6 words; in text order."""
    out: list[str] = []
    for para in text().split("\n"):
        para = para.strip()
        if len(para) < min_chars or para.startswith(("*", "|", "{", "!", "#", ":", ";")):
            continue
        for s in _SENT.split(para):
            s = s.strip()
            if min_chars <= len(s) <= max_chars and len(s.split()) >= 6 and s[-1] in ".!?":
                out.append(s)
                if limit is not None and len(out) >= limit:
                    return out
    return out
