"""save / load / densify: safetensors + JSON round trips, clear errors, failed loads change nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import deftly
from deftly import StructureConfig, adapt, densify, load, save, structurize
from deftly.io.persist import CONFIG_FILE, WEIGHTS_FILE, DeftlyLoadError

pytest.importorskip("safetensors")


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 24), nn.ReLU(), nn.Linear(24, 4))


X = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    types, state = snap
    assert [type(m) for m in model.modules()] == types
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.fixture
def saved(tmp_path):
    m = mlp()
    structurize(m, StructureConfig(structure="monarch", budget=0.5, target_modules=["0"], steps=0))
    structurize(m, StructureConfig(structure="lrbd", budget=0.5, target_modules=["2"], steps=0))
    with torch.no_grad():  # weights that differ from any fresh projection
        for p in m.parameters():
            p.add_(0.01)
    save(m, tmp_path / "ckpt")
    return m, tmp_path / "ckpt"


def test_round_trip_reapplies_surgery_and_weights(saved):
    m, path = saved
    cfg = json.loads((path / CONFIG_FILE).read_text())
    assert cfg["deftly_version"] == deftly.__version__
    assert [(e["name"], e["structure"], e["kind"]) for e in cfg["layers"]] == [("0", "monarch", "structured"),
                                                                               ("2", "lrbd", "structured")]
    assert cfg["layers"][0]["hparams"] == m[0].hparams()
    assert (cfg["layers"][1]["in_features"], cfg["layers"][1]["out_features"]) == (32, 24)
    assert (path / WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    fresh = mlp(seed=1)
    out = load(fresh, path)
    assert out is fresh
    assert type(fresh[0]).__name__ == type(m[0]).__name__ and fresh[2].hparams() == m[2].hparams()
    torch.testing.assert_close(fresh(X), m(X), rtol=0, atol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_missing_files(tmp_path, saved):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(mlp(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing .*deftly\.json"):
        load(mlp(), tmp_path / "empty")
    (path / WEIGHTS_FILE).unlink()
    m = mlp()
    snap = _snapshot(m)
    with pytest.raises(FileNotFoundError, match=r"missing weights file .*model\.safetensors"):
        load(m, path)
    _unchanged(m, snap)


def test_truncated_and_corrupt_weights(saved):
    _, path = saved
    wfile = path / WEIGHTS_FILE
    data = wfile.read_bytes()
    wfile.write_bytes(data[: len(data) // 2])
    m = mlp()
    snap = _snapshot(m)
    with pytest.raises(DeftlyLoadError, match=rf"{WEIGHTS_FILE} is truncated: {len(data) // 2} bytes, expected "
                                              rf"{len(data)} bytes"):
        load(m, path)
    _unchanged(m, snap)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    wfile.write_bytes(bytes(flipped))
    with pytest.raises(DeftlyLoadError, match="is corrupt: SHA-256"):
        load(m, path)
    _unchanged(m, snap)
    # a truncated file without the recorded size is still caught by the safetensors parser
    cfg = json.loads((path / CONFIG_FILE).read_text())
    del cfg["weights"]["bytes"], cfg["weights"]["sha256"]
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    wfile.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeftlyLoadError, match=r"cannot read weights file"):
        load(m, path)
    _unchanged(m, snap)
    (path / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(DeftlyLoadError, match="is not valid JSON"):
        load(m, path)


def test_config_and_model_mismatch(saved):
    _, path = saved
    other = mlp(hidden=40)  # another architecture: layer 0 is 16 -> 40
    snap = _snapshot(other)
    with pytest.raises(DeftlyLoadError, match=r"layer '0'.*shape mismatch: saved 16 -> 32, the model's Linear is "
                                              r"16 -> 40"):
        load(other, path)
    _unchanged(other, snap)
    wrong = nn.Sequential(nn.Linear(16, 32))
    with pytest.raises(DeftlyLoadError, match=r"has no module named '2'"):
        load(wrong, path)
    # weights that do not match the config: edit the saved hyperparameters
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["layers"][1]["hparams"]["rank"] += 1
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    m = mlp()
    snap = _snapshot(m)
    with pytest.raises(DeftlyLoadError, match=r"weight '2\.lowrank\.\w' in .* has shape .* but the model expects"):
        load(m, path)
    _unchanged(m, snap)


def test_unknown_structure_and_bad_hparams(saved):
    _, path = saved
    good = (path / CONFIG_FILE).read_text()
    cfg = json.loads(good)
    cfg["layers"][0]["structure"] = "hexagonal"
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    m = mlp()
    snap = _snapshot(m)
    with pytest.raises(DeftlyLoadError, match=r"layer '0' uses structure 'hexagonal'.*choose one of"):
        load(m, path)
    cfg = json.loads(good)
    cfg["layers"][0]["hparams"]["nblocks"] = 0
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DeftlyLoadError, match=r"layer '0': bad hyperparameters .*nblocks=0 is invalid"):
        load(m, path)
    cfg = json.loads(good)
    cfg["format"] = "something-else"
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DeftlyLoadError, match="not a deftly model description"):
        load(m, path)
    _unchanged(m, snap)


def test_extra_or_missing_weights(saved, tmp_path):
    _, path = saved
    plain = mlp()
    save(plain, tmp_path / "plain")  # no structured layer: loading it into the saved model's config fails
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg["weights"] = json.loads((tmp_path / "plain" / CONFIG_FILE).read_text())["weights"]
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    (path / WEIGHTS_FILE).write_bytes((tmp_path / "plain" / WEIGHTS_FILE).read_bytes())
    target = mlp()
    snap = _snapshot(target)
    with pytest.raises(DeftlyLoadError, match=r"weight\(s\) the rebuilt model needs are not in .*0\.L.*have no "
                                              r"place in the model: 0\.weight"):
        load(target, path)
    _unchanged(target, snap)


def test_adapters_round_trip(tmp_path):
    m = mlp()
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 3}, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.1)
    ref = m(X)
    save(m, tmp_path / "a")
    fresh = mlp()
    load(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(X), ref, rtol=0, atol=0)
    assert not fresh[0].base.weight.requires_grad and fresh[0].delta.U.requires_grad
    ad.merge()
    save(m, tmp_path / "b")
    fresh = mlp()
    load(fresh, tmp_path / "b")
    assert fresh[0].merged
    torch.testing.assert_close(fresh(X), ref, rtol=1e-5, atol=1e-5)


def test_gpt2_tied_weights_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    m = gpt2()
    structurize(m, StructureConfig(structure="monarch", budget=0.5, steps=0))
    with torch.no_grad():
        m.transformer.wte.weight.add_(0.5)  # the tied embedding / head changed after surgery
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = m(ids).logits
    save(m, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / CONFIG_FILE).read_text())
    assert cfg["weights"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    fresh = gpt2()
    load(fresh, tmp_path / "g")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(fresh(ids).logits, ref, rtol=0, atol=0)


def test_densify(saved):
    m, _ = saved
    ref = m(X)
    densify(m)
    assert all(type(x) in (nn.Linear, nn.ReLU, nn.Sequential) for x in m.modules())
    torch.testing.assert_close(m(X), ref, rtol=1e-5, atol=1e-5)
    a = mlp()
    ad = adapt(a, StructureConfig(structure="monarch", hparams={"nblocks": 4}, target_modules=["0"]))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.1)
    ref = a(X)
    densify(a)
    assert type(a[0]) is nn.Linear and a[0].weight.requires_grad
    torch.testing.assert_close(a(X), ref, rtol=1e-5, atol=1e-5)


def test_import_stays_light():
    code = ("import sys, deftly; deftly.structures(); "
            "print(sorted(m for m in ('transformers', 'safetensors', 'deftly.surgery', 'deftly.io.persist') "
            "if m in sys.modules)); deftly.save; print('deftly.io.persist' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out
    assert out[1] == "True"


def test_load_into_a_meta_built_model_materialises_it(saved):
    m, path = saved
    with torch.device("meta"):
        ghost = mlp(seed=3)
    assert all(p.is_meta for p in ghost.parameters())
    out = load(ghost, path)
    assert out is ghost
    assert not any(t.is_meta for t in [*ghost.parameters(), *ghost.buffers()])
    assert ghost[4].weight.requires_grad
    torch.testing.assert_close(ghost(X), m(X), rtol=0, atol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(ghost.state_dict()[k], v), k


def test_load_into_meta_gpt2_keeps_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    structurize(m, StructureConfig(structure="lowrank", budget=0.5, steps=0))
    save(m, tmp_path / "g")
    with torch.device("meta"):
        ghost = transformers.GPT2LMHeadModel(cfg).eval()
    load(ghost, tmp_path / "g")
    assert ghost.lm_head.weight is ghost.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ghost(ids).logits, m(ids).logits, rtol=0, atol=0)


def test_load_refuses_a_meta_model_whose_buffers_are_not_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50)
    torch.manual_seed(0)
    real = transformers.BertModel(cfg)
    structurize(real, StructureConfig(structure="lowrank", budget=0.5, target_modules=["query"], steps=0))
    save(real, tmp_path / "b")
    with torch.device("meta"):
        ghost = transformers.BertModel(cfg)
    snap = [type(x) for x in ghost.modules()]
    with pytest.raises(DeftlyLoadError, match=r"tensors on the meta device that .* cannot fill: "
                                              r"embeddings\.position_ids.*non-persistent.*not changed"):
        load(ghost, tmp_path / "b")
    assert [type(x) for x in ghost.modules()] == snap and all(p.is_meta for p in ghost.parameters())


def test_save_refuses_a_meta_model(tmp_path):
    with torch.device("meta"):
        ghost = mlp()
    with pytest.raises(ValueError, match=r"on the meta device and hold no values \(e.g. '0.weight'\)"):
        save(ghost, tmp_path / "m")


def test_densify_restores_conv1d_through_save_and_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    kinds = [(n, type(x)) for n, x in m.named_modules()]
    structurize(m, StructureConfig(structure="monarch", budget=0.5, steps=0))
    save(m, tmp_path / "g")
    assert {e["original_kind"] for e in json.loads((tmp_path / "g" / CONFIG_FILE).read_text())["layers"]} == {"Conv1D"}
    torch.manual_seed(1)
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    load(fresh, tmp_path / "g")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = fresh(ids).logits
    densify(fresh)
    assert [(n, type(x)) for n, x in fresh.named_modules()] == kinds
    c_fc = fresh.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, Conv1D) and c_fc.weight.shape == (32, 128)
    torch.testing.assert_close(c_fc.weight, m.transformer.h[0].mlp.c_fc.to_dense().T, rtol=0, atol=0)
    torch.testing.assert_close(fresh(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_densify_keeps_frozen_layers_frozen_and_is_atomic(saved):
    import deftly.transforms as T

    m, _ = saved
    m[0].requires_grad_(False)
    densify(m)
    assert not m[0].weight.requires_grad and not m[0].bias.requires_grad and m[2].weight.requires_grad
    model = nn.Sequential(deftly.make("lowrank", 8, 8, rank=2), deftly.make("butterfly", 8, 8, complex=True))
    with pytest.raises(ValueError, match=r"layer '1' \(butterfly\) has a complex weight; a dense Linear "
                                         r"cannot hold it"):
        densify(model)
    assert type(model[0]).__name__ == "LowRank"  # nothing was swapped
    # a fixed transform is not a structured layer (it replaced no Linear): densify leaves it in place
    model = nn.Sequential(deftly.make("lowrank", 8, 8, rank=2), T.hadamard(8, dtype=torch.float32))
    x = torch.randn(3, 8)
    y = model(x)
    densify(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is T.Hadamard
    torch.testing.assert_close(model(x), y)
