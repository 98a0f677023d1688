"""``deftly.plan`` / ``deftly plan``: counts against hand counts, real CPU-built models, the structured
layers' own ``num_params``/``flops``, FlopCounterMode and the published sizes of the presets; nothing is
allocated; the argument model is never changed; CLI exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.surgery.modules import linear_modules, linear_shape, structured_modules

transformers = pytest.importorskip("transformers")

H, I, L, V = 64, 176, 2, 100  # tiny Llama: hidden, intermediate, layers, vocab


def tiny_llama_config():
    return transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                    num_attention_heads=4, num_key_value_heads=4, vocab_size=V,
                                    max_position_embeddings=32, architectures=["LlamaForCausalLM"])


def tiny_gpt2_config():
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                   bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])


def cpu_model(config):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config) if isinstance(config, transformers.LlamaConfig) \
        else transformers.GPT2LMHeadModel(config)


def _row(p, kind):
    return next(r for r in p.rows if r.kind == kind)


def _linear_flops(model) -> int:
    """FLOPs of one token through every linear layer of ``model`` (dense or structured), counted by
    torch's FlopCounterMode."""
    total = 0
    for _, mod in linear_modules(model) + structured_modules(model):
        in_f = mod.in_features if isinstance(mod, deftly.StructuredLinear) else linear_shape(mod)[0]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            mod(torch.randn(1, in_f))
        total += fc.get_total_flops()
    return total


def test_dense_counts_by_hand_and_against_a_real_model():
    cfg = deftly.StructureConfig(structure="lowrank", budget=0.5)
    p = deftly.plan(tiny_llama_config(), cfg)
    attn, mlp = H * H, H * I  # Llama linears have no bias
    by_hand = L * (4 * attn + 3 * mlp + 2 * H) + H + 2 * V * H  # + norms, final norm, embed, untied head
    model = cpu_model(tiny_llama_config())
    assert p.params_before == by_hand == sum(t.numel() for t in model.parameters())
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        r = _row(p, kind)
        assert (r.layers, r.shape, r.params_before, r.flops_before) == (L, f"{H} x {H}", L * attn, 2 * L * attn)
    for kind in ("mlp.gate_proj", "mlp.up_proj"):
        assert (_row(p, kind).shape, _row(p, kind).params_before) == (f"{I} x {H}", L * mlp)
    assert _row(p, "mlp.down_proj").shape == f"{H} x {I}"
    head = _row(p, "lm_head")
    assert head.structure == "dense (not targeted)" and head.params_before == head.params_after == V * H
    assert _row(p, "other (embeddings, norms, ...)").params_before == V * H + L * 2 * H + H
    assert p.flops_before == 2 * (L * (4 * attn + 3 * mlp) + V * H) == _linear_flops(model)
    fp32, _ = p.memory(4)
    assert fp32 == pytest.approx(by_hand * 4 / 2**30)


@pytest.mark.parametrize("structure", ["monarch", "lowrank", "blockdiag"])
def test_structured_counts_equal_the_layers_and_a_real_structurize(structure):
    """After: the structured layers' num_params/flops on the meta copy, sum(p.numel()) of the copy, and a
    real structurize of the CPU-built model with the same config (same hyperparameters, same totals,
    FLOPs counted by FlopCounterMode) all agree."""
    cfg = deftly.StructureConfig(structure=structure, budget=0.3, init="random")
    p = deftly.plan(tiny_llama_config(), cfg)
    layers = structured_modules(p.model)
    assert len(layers) == L * 7
    assert p.params_after == sum(t.numel() for t in p.model.parameters())
    for kind in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
        mine = [m for n, m in layers if n.endswith("." + kind)]
        assert _row(p, kind).params_after == sum(m.num_params() for m in mine)
        assert _row(p, kind).flops_after == sum(m.flops() for m in mine)
    real = cpu_model(tiny_llama_config())
    report = deftly.structurize(real, cfg)
    assert p.params_after == sum(t.numel() for t in real.parameters())
    assert [r.hparams for r in report.layers] == [m.hparams() for _, m in layers]
    if deftly.get(structure).flop_counter_exact:
        assert p.flops_after == _linear_flops(real)


def test_tied_head_counted_once_gpt2_conv1d():
    p = deftly.plan(tiny_gpt2_config(), deftly.StructureConfig(structure="monarch", budget=0.5))
    model = cpu_model(tiny_gpt2_config())
    assert p.params_before == sum(t.numel() for t in model.parameters())  # wte = lm_head, once
    head = _row(p, "lm_head")
    assert head.params_before == 0 and head.flops_before == 2 * 32 * 50  # the tied weight lives in wte
    c_attn = _row(p, "attn.c_attn [Conv1D]")
    assert (c_attn.shape, c_attn.params_before) == ("96 x 32", 2 * (32 * 96 + 96))


def test_presets_match_published_sizes():
    """Known answers: Llama-7B has 6,738,415,616 parameters, GPT-2 XL 1,557,611,200, BERT-base with its
    MLM head (bert-base-uncased) 109,514,298; lowrank at 0.25 needs no weights and runs in seconds."""
    cfg = deftly.StructureConfig(structure="lowrank", budget=0.25)
    sizes = {"llama-7b": 6_738_415_616, "gpt2-xl": 1_557_611_200, "bert-base": 109_514_298}
    for name, n in sizes.items():
        p = deftly.plan(name, cfg)
        assert p.params_before == n
        assert all(t.is_meta for t in (*p.model.parameters(), *p.model.buffers()))  # nothing allocated
        layers = [m for _, m in structured_modules(p.model)]
        assert layers and all(m.rank * (m.in_features + m.out_features) <= 0.25 * m.in_features * m.out_features
                              for m in layers)  # each low-rank weight within the budget
        assert p.params_after == sum(t.numel() for t in p.model.parameters())
        if name == "llama-7b":  # no biases: the attention rows are rank * (4096 + 4096) per layer
            q = _row(p, "self_attn.q_proj")
            rank = p.model.get_submodule("model.layers.0.self_attn.q_proj").rank
            assert (q.layers, q.hparams, q.params_after) == (32, f"rank={rank}", 32 * rank * 8192)


def test_module_argument_is_copied_not_changed():
    model = cpu_model(tiny_llama_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = deftly.plan(model, deftly.StructureConfig(structure="monarch", budget=0.3))
    assert not any(isinstance(m, deftly.StructuredLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(t.is_meta for t in p.model.parameters())
    assert p.params_before == sum(t.numel() for t in model.parameters())
    # the planned layers materialise into working ones (to_empty + reset_parameters); the rest of a
    # Hugging Face model needs transformers' own init (its rotary buffers are not deftly's)
    p.model.to_empty(device="cpu")
    x = torch.randn(3, H)
    for _, layer in structured_modules(p.model):
        layer.reset_parameters()
        if layer.in_features == H:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), x @ layer.to_dense().T, rtol=1e-5, atol=1e-5)


def test_config_path_and_model_dir(tmp_path):
    cfg = tiny_llama_config()
    cfg.save_pretrained(tmp_path)
    s = deftly.StructureConfig(structure="lowrank", budget=0.5)
    a = deftly.plan(str(tmp_path), s)
    b = deftly.plan(tmp_path / "config.json", s)
    c = deftly.plan(cfg, s)
    assert a.params_before == b.params_before == c.params_before
    assert a.params_after == b.params_after == c.params_after


def test_errors():
    s = deftly.StructureConfig(structure="lowrank", budget=0.5)
    with pytest.raises(ValueError, match=r"unknown model 'llama7b'.*Did you mean 'llama-7b'"):
        deftly.plan("llama7b", s)
    with pytest.raises(TypeError, match="StructureConfig"):
        deftly.plan("bert-base", {"structure": "lowrank"})
    with pytest.raises(ValueError, match="select='error'.*needs the"):
        deftly.plan("bert-base", deftly.StructureConfig(structure="lowrank", budget=0.5, select="error"))
    with pytest.raises(TypeError, match="model_or_config"):
        deftly.plan(3, s)


def _cli(capsys, *args) -> tuple[int, str, str]:
    from deftly.cli import main

    try:
        code = main(["plan", *args])
    except SystemExit as exit_:  # argparse's own errors (bad option values)
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli(tmp_path, capsys):
    cfg = tiny_gpt2_config()
    cfg.save_pretrained(tmp_path)
    out_json = tmp_path / "plan.json"
    # one real process end to end (the entry point, exit status 0)
    r = subprocess.run([sys.executable, "-m", "deftly.cli", "plan", str(tmp_path), "--structure", "monarch",
                        "--budget", "0.5", "--json", str(out_json)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "attn.c_attn [Conv1D]" in r.stdout and "weights bf16 (GiB)" in r.stdout
    data = json.loads(out_json.read_text())
    p = deftly.plan(cfg, deftly.StructureConfig(structure="monarch", budget=0.5))
    assert data["totals"]["params_before"] == p.params_before
    assert [row["kind"] for row in data["rows"]] == [row.kind for row in p.rows]
    code, out, _ = _cli(capsys, str(tmp_path), "--structure", "lowrank", "--budget", "0.5", "--target-modules",
                        "c_fc", "--markdown")
    assert code == 0
    assert "| mlp.c_fc [Conv1D] |" in out and "| attn.c_attn [Conv1D] | 2 | 96 x 32 | dense" in out
    for args, want in [(["llama7b", "--structure", "monarch"], "Did you mean 'llama-7b'"),
                       (["bert-base", "--structure", "monarh"], "Did you mean 'monarch'"),
                       ([str(tmp_path), "--structure", "lowrank", "--target-modules", "c_fcc"], "c_fc"),
                       ([str(tmp_path / "nope.json"), "--structure", "lowrank"], "unknown model"),
                       (["bert-base", "--structure", "lowrank", "--budget", "2"], "budget=2.0 is out of range")]:
        code, out, err = _cli(capsys, *args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deftly plan: error:") and want in lines[0], err


# ------------------------------------------------------------------------------------------ speed-up
class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _speed_model():
    """Two blocks (kinds ``up`` 128 x 64 and ``down`` 64 x 128, two layers each) and a dense head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(_Block(), _Block(), torch.nn.Linear(64, 10))


_SPEED_CFG = dict(structure="monarch", budget=0.5, exclude_modules=["2"])


def _cache_file(tmp_path):
    return tmp_path / "latency.json"


def test_speedup_from_known_cached_timings(monkeypatch, tmp_path):
    """Timings written into the cache by hand: the per-kind and total speed-ups are the ratios of those
    numbers (dense head on both sides), nothing is measured (measure=False), and a missing timing is
    reported as not timed rather than guessed."""
    from deftly.surgery import latency

    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path))
    model, cfg, speed = _speed_model(), deftly.StructureConfig(**_SPEED_CFG), latency.Latency(rows=16)
    plain = deftly.plan(model, cfg)
    hp = {n.rsplit(".", 1)[-1]: m.hparams() for n, m in structured_modules(plain.model)}
    assert set(hp) == {"up", "down"}
    # [structured seconds, dense seconds] of one call at 16 rows: up 2 vs 5, down 3 vs 4, head (dense) 6
    mine = {latency._key("monarch", 64, 128, hp["up"], speed): [2.0, 5.0],
            latency._key("monarch", 128, 64, hp["down"], speed): [3.0, 4.0],
            latency._key("dense", 64, 10, {}, speed): [9.0, 6.0]}
    _cache_file(tmp_path).write_text(json.dumps({latency._machine(): mine}))
    p = deftly.plan(model, cfg, speed=speed, measure=False)
    up, down, head = _row(p, "up"), _row(p, "down"), _row(p, "2")
    assert (up.dense_seconds, up.planned_seconds, up.speedup) == (10.0, 4.0, 2.5)
    assert (down.dense_seconds, down.planned_seconds, down.speedup) == (8.0, 6.0, 8.0 / 6.0)
    assert (head.dense_seconds, head.planned_seconds, head.speedup) == (6.0, 6.0, 1.0)
    assert (p.dense_seconds, p.planned_seconds, p.speedup) == (24.0, 16.0, 1.5)
    assert json.loads(_cache_file(tmp_path).read_text()) == {latency._machine(): mine}  # nothing measured
    text, md, d = str(p), p.to_markdown(), p.to_dict()
    assert "speed-up (linear, 16 rows)" in text and "measured on this machine" in text
    assert "not a prediction for other hardware" in p.title()
    assert "| speed-up (linear, 16 rows) |" in md and "| **1.50x** |" in md and "| 2.50x |" in md
    assert d["totals"]["speedup"] == 1.5 and d["speed"]["rows"] == 16
    assert [r["speedup"] for r in d["rows"]] == [2.5, 8.0 / 6.0, 1.0, None]
    json.dumps(d)
    # a missing timing (the head's), not measured: that row and the total are "not timed"
    del mine[latency._key("dense", 64, 10, {}, speed)]
    _cache_file(tmp_path).write_text(json.dumps({latency._machine(): mine}))
    q = deftly.plan(model, cfg, speed=speed, measure=False)
    assert _row(q, "up").speedup == 2.5 and _row(q, "2").speedup is None and q.speedup is None
    assert "not timed" in str(q)
    # without speed: the output is as before (no column, no keys)
    assert "speed-up" not in str(plain) + plain.to_markdown()
    assert "speed" not in plain.to_dict() and "dense_seconds" not in plain.to_dict()["rows"][0]
    with pytest.raises(TypeError, match="speed must be"):
        deftly.plan(model, cfg, speed=16)


def test_speedup_measured_fills_the_cache(monkeypatch, tmp_path):
    """A real measurement (tiny shapes, short timing): every layer shape is timed once and cached, the
    figures are the ratios of the cached numbers, and a second plan reads them back without measuring."""
    from deftly.surgery import latency

    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path))
    model, cfg = _speed_model(), deftly.StructureConfig(**_SPEED_CFG)
    speed = latency.Latency(rows=8, seconds=0.01)
    p = deftly.plan(model, cfg, speed=speed)
    mine = json.loads(_cache_file(tmp_path).read_text())[latency._machine()]
    hp = {n.rsplit(".", 1)[-1]: m.hparams() for n, m in structured_modules(p.model)}
    keys = {"up": latency._key("monarch", 64, 128, hp["up"], speed),
            "down": latency._key("monarch", 128, 64, hp["down"], speed),
            "2": latency._key("dense", 64, 10, {}, speed)}
    assert set(mine) == set(keys.values())
    assert all(t > 0 and td > 0 for t, td in mine.values())
    for kind, key in keys.items():
        t, td = mine[key]
        n = _row(p, kind).layers
        assert _row(p, kind).speedup == pytest.approx(td / (t if kind != "2" else td))
        assert _row(p, kind).dense_seconds == pytest.approx(n * td)
    total_dense = sum(_row(p, k).layers * mine[key][1] for k, key in keys.items())
    total_planned = 2 * mine[keys["up"]][0] + 2 * mine[keys["down"]][0] + mine[keys["2"]][1]
    assert p.speedup == pytest.approx(total_dense / total_planned)
    again = deftly.plan(model, cfg, speed=speed, measure=False)
    assert [r.speedup for r in again.rows] == [r.speedup for r in p.rows] and again.speedup == p.speedup
    one = latency.layer_speedup("monarch", 64, 128, hp["up"], speed, measure=False)
    assert one is not None and (one.seconds, one.dense_seconds) == tuple(mine[keys["up"]])
    assert latency.layer_speedup("monarch", 64, 128, hp["up"], latency.Latency(rows=9), measure=False) is None


def test_cli_speed_and_latency_budget(monkeypatch, tmp_path, capsys):
    """``--speed`` adds the column; ``--budget-kind latency`` takes a list of structures. The clock is fake
    (time = the layer's FLOP share, dense = 1), so each structured row's speed-up is its FLOP ratio."""
    from deftly.surgery import latency

    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "_measure", lambda s, i, o, hp, opts:
                        (deftly.get(s).flop_count(i, o, **hp) / (2 * i * o), 1.0))
    tiny_gpt2_config().save_pretrained(tmp_path / "m")
    out_json = tmp_path / "plan.json"
    code, out, err = _cli(capsys, str(tmp_path / "m"), "--structure", "monarch,lowrank", "--budget", "0.5",
                          "--budget-kind", "latency", "--speed", "8", "--speed-mode", "train", "--json",
                          str(out_json))
    assert code == 0, err
    assert "speed-up (linear, 8 rows)" in out and "float32 train, measured on this machine" in out
    d = json.loads(out_json.read_text())
    assert d["config"]["structure"] == ["monarch", "lowrank"] and d["config"]["latency"]["rows"] == 8
    assert d["speed"]["mode"] == "train"
    timed = json.loads(_cache_file(tmp_path).read_text())[latency._machine()]
    assert {json.loads(k)[0] for k in timed} == {"monarch", "lowrank", "dense"}  # every candidate tried
    rows = [r for r in d["rows"] if r["layers"] and r["structure"] != "dense (not targeted)"]
    assert rows and all(r["structure"] in ("monarch", "lowrank") for r in rows)
    for r in rows:
        assert r["flops_after"] <= 0.5 * r["flops_before"]
        assert r["speedup"] == pytest.approx(r["flops_before"] / r["flops_after"])
    for args, want in [(["--speed", "0"], "'0' is not a number of rows"),
                       (["--speed", "many"], "'many' is not a number of rows"),
                       (["--speed-mode", "train"], "--speed-mode train needs --speed ROWS"),
                       (["--speed", "8", "--speed-mode", "fast"], "invalid choice: 'fast'"),
                       (["--structure", "monarch,lowrank"], "add --budget-kind latency")]:
        argv = [str(tmp_path / "m"), "--structure", "monarch", "--budget", "0.5", *args]
        code, out, err = _cli(capsys, *argv)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deftly plan: error:") and want in lines[0], err
        if "number of rows" in want:
            assert "e.g. --speed 4096" in lines[0]


def test_latency_candidates_survive_dataclasses_replace():
    """``dataclasses.replace`` (used by plan and the sensitivity allocation) keeps every candidate."""
    import dataclasses

    from deftly import StructureConfig

    cfg = StructureConfig(structure=["monarch", "lowrank"], budget=0.5, budget_kind="latency")
    copy = dataclasses.replace(cfg, init="random")
    assert copy.candidates == ("monarch", "lowrank") and copy.structure == "monarch"
    assert dataclasses.replace(StructureConfig(structure="lowrank", budget=0.5)).candidates == ()
