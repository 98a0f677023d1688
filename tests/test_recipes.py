"""The recipes and commands run end to end on small slices of the real data, and their metrics are right."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deftly
from deftly.cli import main
from deftly.data import MissingDataError


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _need_fashion():
    from deftly.data import fashion_mnist

    try:
        fashion_mnist.load("test", limit=1)
    except MissingDataError as err:
        pytest.skip(str(err))


def _need_wiki():
    from deftly.data import wikipedia

    try:
        wikipedia._source_path()
    except MissingDataError as err:
        pytest.skip(str(err))


def _need_minilm():
    """transformers, the Wikipedia text, the MiniLM weights and the review snippets, or a skip."""
    pytest.importorskip("transformers")
    _need_wiki()
    from deftly.data import minilm, reviews

    try:
        minilm.model_path()
        reviews.corpus_path()
    except MissingDataError as err:
        pytest.skip(str(err))


# ------------------------------------------------------------------ metrics on known models
class Constant(nn.Module):
    def __init__(self, cls: int, n: int = 10) -> None:
        super().__init__()
        self.cls, self.n = cls, n

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n)
        out[:, self.cls] = 1.0
        return out


def test_accuracy_of_known_models_on_the_real_test_set():
    _need_fashion()
    from deftly.data import fashion_mnist
    from deftly.train.fashion import accuracy

    xt, yt = fashion_mnist.tensors("test")
    assert accuracy(Constant(3), xt, yt) == 0.1  # 1,000 of each class among 10,000
    oracle = nn.Embedding(10, 10)
    with torch.no_grad():
        oracle.weight.copy_(torch.eye(10))
    # a model that reads the label: fed one-hot labels, it is right exactly where labels agree
    wrong = yt.clone()
    wrong[:250] = (wrong[:250] + 1) % 10
    assert accuracy(lambda_model(oracle), wrong, yt, batch_size=333) == pytest.approx(0.975)
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        accuracy(Constant(0), torch.zeros(3, 784), torch.zeros(2, dtype=torch.long))


def lambda_model(emb: nn.Module) -> nn.Module:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, y):
            return self.emb(y)

    return M()


def test_val_bits_per_char_of_a_uniform_model_is_log2_vocab():
    from deftly.train.charlm import val_bits_per_char

    class Uniform(nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 37)

    windows = torch.randint(0, 37, (5, 17))
    assert val_bits_per_char(Uniform(), windows, batch_size=2) == pytest.approx(math.log2(37), rel=1e-6)


def test_interpolation_at_equal_time():
    from deftly.train.charlm import interpolate_at

    hist = [{"t": 1.0, "val_bpc": 4.0}, {"t": 3.0, "val_bpc": 2.0}]
    assert interpolate_at(hist, "t", 2.0) == pytest.approx(3.0)
    assert interpolate_at(hist, "t", 3.0) == 2.0
    assert interpolate_at(hist, "t", 0.5) == 4.0
    assert interpolate_at(hist, "t", 3.5) is None  # never extrapolated


def test_logistic_probe_matches_scikit_learn():
    from deftly.train.minilm import logistic_probe

    rng = np.random.RandomState(0)
    x = rng.randn(400, 6)
    y = (x @ rng.randn(6) + 0.7 * rng.randn(400) > 0).astype(np.int64)
    xt, yt, xs, ys = (torch.from_numpy(a) for a in (x[:300], y[:300], x[300:], y[300:]))
    acc = logistic_probe(xt, yt, xs, ys)
    sklearn = pytest.importorskip("sklearn.linear_model")
    ref = sklearn.LogisticRegression(C=1.0, max_iter=1000).fit(x[:300], y[:300]).score(x[300:], y[300:])
    assert acc == pytest.approx(ref, abs=0.011)  # at most one of 100 test points differs
    sep = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    assert logistic_probe(sep, torch.tensor([0, 0, 1, 1]), sep, torch.tensor([0, 0, 1, 1])) == 1.0


# ------------------------------------------------------------------ recipes end to end
def _check_run_dir(out: Path, n_rows: int) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == n_rows
    assert data["seed"] == 0 and data["versions"]["torch"] == torch.__version__
    assert (out / "results.md").read_text().startswith("# ")
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def test_fashion_mnist_recipe_end_to_end_and_resume(tmp_path):
    _need_fashion()
    from deftly.train.fashion import FashionConfig, run

    with pytest.raises(ValueError, match=r"unknown structure 'lowrnk'.*Did you mean 'lowrank'\?"):
        FashionConfig(structures=("dense", "lowrnk"))  # was: skipped with a note, an empty table, exit 0
    cfg = FashionConfig(structures=("dense", "lowrank"), width=32, depth=2, epochs=1,
                        batch_size=64, train_limit=512, test_limit=200)
    res = run(cfg, tmp_path / "fm", progress=False)
    data = _check_run_dir(tmp_path / "fm", 2)
    dense, low = data["rows"]
    assert dense["structure"] == "dense" and dense["gap"] == 0 and dense["hidden_fraction"] == 1.0
    assert low["hidden_params"] <= 0.1 * 32 * 32 and low["hparams"] == {"rank": 1}
    assert 0 <= low["test_acc"] <= 100 and low["test_acc"] * 2 % 1 == 0  # a count out of 200 test images
    assert low["gap"] == pytest.approx(low["test_acc"] - dense["test_acc"])
    # resume reuses finished models without training again
    again = run(cfg, tmp_path / "fm", resume=True, progress=False)
    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in res["rows"]]


def test_fashion_mnist_mixer_model():
    from deftly.train.fashion import FashionConfig, Mixer

    m = Mixer("lowrank", 0.25, width=16, depth=1)
    assert m(torch.randn(3, 784)).shape == (3, 10)
    assert all(type(layer).__name__ == "LowRank" for layer in m.hidden_layers())
    with pytest.raises(ValueError, match="model='cnn'"):
        FashionConfig(model="cnn")


def test_charlm_recipe_end_to_end(tmp_path):
    _need_wiki()
    from deftly.train.charlm import CharLMConfig, run

    cfg = CharLMConfig(structures=("dense", "lowrank"), layers=1, d=32, heads=2, ctx=16, batch_size=4, steps=4,
                       warmup=1, eval_every=2, eval_windows=4, text_limit=30_000, clock="process")
    res = run(cfg, tmp_path / "lm", progress=False)
    data = _check_run_dir(tmp_path / "lm", 2)
    dense, low = data["rows"]
    assert dense["steps"] == 4 and low["steps"] >= 4 and low["steps"] % 2 == 0
    assert low["linear_fraction"] <= 0.25
    assert 0 < dense["val_bpc_equal_steps"] < math.log2(200)
    assert low["rel_equal_steps"] == pytest.approx(low["val_bpc_equal_steps"] / dense["val_bpc_equal_steps"] - 1)
    assert [h["step"] for h in res["rows"][0]["history"]] == [2, 4]


def test_minilm_recipe_end_to_end(tmp_path):
    _need_minilm()
    from deftly.train.minilm import MiniLMConfig, run

    # uniform budgets: the sensitivity allocation has its own tests (tests/test_minilm_sensitivity.py)
    cfg = MiniLMConfig(structure="blockdiag", budget=0.25, max_steps=2, batch_size=4, max_length=16,
                       eval_sentences=16, calibration_sentences=8, probe_limit=60, train_sentences=32,
                       allocation="uniform")
    run(cfg, tmp_path / "ml", progress=False)
    data = _check_run_dir(tmp_path / "ml", 3)
    teacher, projected, healed = data["rows"]
    assert teacher["cosine"] == pytest.approx(1.0, abs=1e-5) and teacher["probe_rel"] == 1.0
    assert 0.2 < projected["linear_fraction"] <= 0.25 and healed["steps"] == 2
    assert -1 <= projected["cosine"] < 0.999 and 0 <= healed["probe_acc"] <= 1


def test_minilm_recipe_options_and_resume_reuses_the_projection(tmp_path, capsys):
    """Per-kind budgets, layer-wise distillation and length grouping run end to end; --resume reuses the
    saved projected student (same projected row, no second surgery)."""
    _need_minilm()
    from deftly.train.minilm import MiniLMConfig, run

    cfg = MiniLMConfig(structure="lowrank", budget=0.25, attention_budget=0.2, ffn_budget=0.3, hidden_weight=1.0,
                       cosine_weight=5.0, group_by_length=True, min_lr_ratio=0.5, max_steps=2, batch_size=4,
                       max_length=16, eval_sentences=16, calibration_sentences=8, probe_limit=60,
                       train_sentences=32, allocation="uniform")  # sensitivity: tests/test_minilm_sensitivity.py
    run(cfg, tmp_path / "ml", progress=False)
    first = _check_run_dir(tmp_path / "ml", 3)
    assert (tmp_path / "ml" / "projected").is_dir()
    projected = first["rows"][1]
    # attention 4 x 384^2 at 20%, FFN 2 x 1536 x 384 at 30%: between the two
    assert 0.2 < projected["linear_fraction"] <= 0.3 and first["rows"][2]["steps"] == 2
    notes = " ".join(first["notes"])
    assert "attention linears at <= 20.0%" in notes and "intermediate layers" in notes and "grouped" in notes
    (tmp_path / "ml" / "student.safetensors").unlink()  # a fresh distillation, reusing the projection
    run(cfg, tmp_path / "ml", resume=True, progress=True)
    assert "reusing the projected student" in capsys.readouterr().out
    again = _check_run_dir(tmp_path / "ml", 3)
    assert again["rows"][1] == projected and again["rows"][2]["steps"] == 2
    assert -1 <= again["rows"][2]["cosine"] <= 1


def test_minilm_distillation_loss_terms():
    pytest.importorskip("transformers")
    from deftly.train.minilm import MiniLMConfig, distillation_loss

    try:
        from deftly.data import minilm
        tok, teacher = minilm.load()
    except MissingDataError as err:
        pytest.skip(str(err))
    import copy

    batch = dict(tok(["A short sentence.", "Another, somewhat longer sentence about trains."], padding=True,
                     return_tensors="pt"))
    with torch.no_grad():
        assert float(distillation_loss(teacher, 10.0, 1.0)(teacher, batch)) == pytest.approx(0.0, abs=1e-5)
        student = copy.deepcopy(teacher)
        student.encoder.layer[0].output.dense.weight.mul_(0.5)  # an early layer differs
        last = float(distillation_loss(teacher, 10.0, 0.0)(student, batch))
        both = float(distillation_loss(teacher, 10.0, 1.0)(student, batch))
        no_cos = float(distillation_loss(teacher, 0.0, 0.0)(student, batch))
    assert 0 < no_cos < last < both
    for bad in ({"hidden_weight": -1.0}, {"attention_budget": 0.0}, {"ffn_budget": 1.5}, {"min_lr_ratio": 2.0}):
        with pytest.raises(ValueError):
            MiniLMConfig(**bad)


# ------------------------------------------------------------------ commands
def test_demo_and_report_commands(tmp_path, capsys):
    _need_fashion()
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--structures", "dense,blockdiag", "--epochs", "1", "--width", "32",
                 "--train-limit", "512", "--test-limit", "100", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| dense |" in text and "| blockdiag |" in text and "gap to dense" in text
    assert (out / "pareto.png").exists()
    assert main(["report", str(out), str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert len(merged["rows"]) == 4 and {r["run"] for r in merged["rows"]} == {"demo"}
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_train_command_rejects_bad_values(capsys):
    assert main(["train", "fashion-mnist", "--fraction", "1.5"]) == 2
    assert "fraction=1.5" in capsys.readouterr().err


def test_nothing_trained_is_an_error_not_an_empty_table(tmp_path, capsys):
    """Every structure skipped (no hyperparameters fit the budget): exit 2 naming why, no results written
    (was: an empty table and exit 0)."""
    _need_fashion()
    out = tmp_path / "none"
    assert main(["train", "fashion-mnist", "--structures", "monarch", "--fraction", "0.0001", "--width", "16",
                 "--epochs", "1", "--train-limit", "256", "--test-limit", "50", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was trained: monarch: skipped" in err[0] and "fraction=0.0001" in err[0], err
    assert not (out / "results.json").exists()


def test_forward_flops_counts_every_row_once():
    from deftly.train.common import forward_flops
    from deftly.train.fashion import Mixer

    mlp = nn.Sequential(nn.Linear(784, 64), nn.GELU(), deftly.make("lowrank", 64, 64, rank=4), nn.Linear(64, 10))
    assert forward_flops(mlp, torch.zeros(1, 784)) == 2 * 784 * 64 + 2 * 4 * (64 + 64) + 2 * 64 * 10
    assert forward_flops(mlp, torch.zeros(3, 784)) == 3 * forward_flops(mlp, torch.zeros(1, 784))
    mixer = Mixer("dense", 1.0, width=16, depth=1)  # 49 tokens of 16 pixels
    per_token = 2 * 16 * 16 + 2 * 16 * 32 + 2 * 32 * 16
    token_mixing = 16 * (2 * 49 * 98 + 2 * 98 * 49)  # 16 channels, each a row of the token MLP
    assert forward_flops(mixer, torch.zeros(1, 784)) == 49 * per_token + token_mixing + 2 * 16 * 10
    if "lrbd" in deftly.structures():  # a composite structure counts its parts once
        layer = deftly.make("lrbd", 64, 64, **deftly.get("lrbd").examples(64, 64)[0])
        assert forward_flops(nn.Sequential(layer), torch.zeros(2, 64)) == 2 * layer.flops(1)
