"""Model surgery: target matching, budgets, overrides, reports, atomicity, nn.Linear and GPT-2 Conv1D."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deftly
from deftly import StructureConfig, structurize
from deftly.surgery.modules import linear_modules


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        x = x + self.value(torch.tanh(self.query(x)))
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, vocab=50, d=24, h=48, layers=2, classes=5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))


def test_all_linear_replaces_everything_but_the_head():
    m = net()
    report = structurize(m, StructureConfig(structure="lowrank", budget=0.5))
    names = [r.name for r in report.layers]
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("query", "value", "up", "down")]
    assert isinstance(m.head, nn.Linear)
    for n in names:
        assert isinstance(m.get_submodule(n), deftly.get("lowrank"))
    assert m(IDS).shape == (4, 7, 5)
    assert linear_modules(m) == [("head", m.head)]  # structured layers are no longer candidates


@pytest.mark.parametrize("structure", ["lowrank", "blockdiag", "monarch", "lrbd"])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_budget_is_met_per_layer_and_in_total(structure, budget):
    m = net()
    before = sum(p.numel() for p in m.parameters())
    report = structurize(m, StructureConfig(structure=structure, budget=budget, steps=0))
    for r in report.layers:
        bias = r.params_before - r.in_features * r.out_features  # the budget is on the weight; biases stay
        assert r.params_after - bias <= budget * r.in_features * r.out_features, r
        assert r.params_after == m.get_submodule(r.name).num_params()
        assert r.flops_after == m.get_submodule(r.name).flops()
        assert r.flops_before == 2 * r.in_features * r.out_features
        # lrbd carries a fixed identity, which a small rectangular weight has to cancel: no zero baseline
        assert 0 <= r.error <= (1.0 if structure != "lrbd" else float("inf"))
    weights = sum(r.in_features * r.out_features for r in report.layers)
    biases = report.params_before - weights
    assert report.params_after - biases <= budget * weights
    assert report.params_after - biases > 0.6 * budget * weights  # close to the budget, not far below
    assert report.model_params_before == before
    assert report.model_params_after == sum(p.numel() for p in m.parameters())
    assert report.model_params_before - report.model_params_after == report.params_before - report.params_after


def test_flop_budget():
    m = net()
    report = structurize(m, StructureConfig(structure="monarch", budget=0.3, budget_kind="flops", steps=0))
    for r in report.layers:
        assert r.flops_after <= 0.3 * r.flops_before


def test_dense_and_full_rank_reproduce_the_model():
    m = net()
    ref = m(IDS)
    structurize(m, StructureConfig(structure="dense"))
    torch.testing.assert_close(m(IDS), ref, rtol=1e-5, atol=1e-5)
    m = net()
    report = structurize(m, StructureConfig(structure="lowrank", hparams={"rank": 24}, target_modules=["query"]))
    torch.testing.assert_close(m(IDS), ref, rtol=1e-4, atol=1e-4)
    assert all(r.error < 1e-6 for r in report.layers)


def test_target_forms_regex_list_and_exclude():
    report = structurize(net(), StructureConfig(structure="lowrank", budget=0.5,
                                                target_modules=r"blocks\.0\..*", steps=0))
    assert [r.name for r in report.layers] == ["blocks.0.query", "blocks.0.value", "blocks.0.up", "blocks.0.down"]
    report = structurize(net(), StructureConfig(structure="lowrank", budget=0.5, target_modules=["up", "blocks.1.down"]))
    assert [r.name for r in report.layers] == ["blocks.0.up", "blocks.1.up", "blocks.1.down"]
    report = structurize(net(), StructureConfig(structure="lowrank", budget=0.5, exclude_modules=["value", "up"]))
    assert [r.name for r in report.layers] == ["blocks.0.query", "blocks.0.down", "blocks.1.query", "blocks.1.down"]
    report = structurize(net(), StructureConfig(structure="lowrank", budget=0.5, target_modules=["head"]))
    assert [r.name for r in report.layers] == ["head"]  # the head only when named


def test_patterns_that_match_nothing_list_the_candidates():
    with pytest.raises(ValueError, match=r"entry 'qury' matches no linear layer.*Did you mean 'query'.*"
                                         r"candidate linear layers: blocks\.0\.query"):
        structurize(net(), StructureConfig(structure="lowrank", budget=0.5, target_modules=["qury"]))
    with pytest.raises(ValueError, match=r"matches no linear layer\. It occurs inside .*re\.fullmatch.*"
                                         r"'\.\*query\.\*'"):
        structurize(net(), StructureConfig(structure="lowrank", budget=0.5, target_modules="query"))
    with pytest.raises(ValueError, match=r"exclude_modules entry 'nothing' matches no linear layer"):
        structurize(net(), StructureConfig(structure="lowrank", budget=0.5, exclude_modules=["nothing"]))
    with pytest.raises(ValueError, match=r"overrides pattern 'head' matches no targeted layer"):
        structurize(net(), StructureConfig(structure="lowrank", budget=0.5, overrides={"head": {"rank": 2}}))


def weight_before(r):
    return r.in_features * r.out_features


def weight_after(r):
    """Structured parameters without the bias (the budget is on the weight; biases stay dense)."""
    return r.params_after - (r.params_before - weight_before(r))


def test_overrides_structure_budget_and_partial_hparams():
    m = net()
    cfg = StructureConfig(structure="monarch", budget=0.5, steps=0, overrides={
        "query": {"structure": "lowrank", "rank": 2},  # 120 params: within both budgets
        r"blocks\.1\..*": {"budget": 0.25},
        "up": {"nblocks": 2},
    })
    report = structurize(m, cfg)
    q = report["blocks.0.query"]
    assert (q.structure, q.hparams) == ("lowrank", {"rank": 2})
    assert weight_after(report["blocks.1.value"]) <= 0.25 * weight_before(report["blocks.1.value"])
    for name in ("blocks.0.up", "blocks.1.up"):
        assert report[name].hparams["nblocks"] == 2
    assert weight_after(report["blocks.1.up"]) <= 0.25 * weight_before(report["blocks.1.up"])
    assert isinstance(m.blocks[0].query, deftly.get("lowrank"))
    assert isinstance(m.blocks[0].down, deftly.get("monarch"))


def test_report_table_and_markdown():
    report = structurize(net(), StructureConfig(structure="monarch", budget=0.5, steps=0))
    text = str(report)
    for want in ("blocks.0.query", "monarch", "nblocks=", "TOTAL targeted layers", "TOTAL whole model",
                 f"{report.model_params_before:,}", f"{report.params_after:,}", "weight error"):
        assert want in text, want
    md = report.to_markdown()
    assert md.splitlines()[0].startswith("| layer | shape (out x in) |")
    assert len(md.splitlines()) == 2 + len(report.layers) + 2
    d = report.to_dict()
    assert d["totals"]["params_after"] == report.params_after
    assert d["layers"][0]["name"] == "blocks.0.query"
    assert "monarch" in repr(report)


def test_random_init_keeps_architecture_and_is_seeded():
    a, b = net(), net()
    ra = structurize(a, StructureConfig(structure="monarch", budget=0.5, init="random", seed=3))
    structurize(b, StructureConfig(structure="monarch", budget=0.5, init="random", seed=3))
    assert all(r.error is None for r in ra.layers)
    assert "weight error" not in str(ra)
    torch.testing.assert_close(a(IDS), b(IDS), rtol=0, atol=0)


def test_activation_aware_surgery_reports_both_errors():
    m = net()
    calib = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(1))
    report = structurize(m, StructureConfig(structure="lowrank", budget=0.25, calibration=calib))
    for r in report.layers:
        assert r.output_error is not None and r.plain_output_error is not None
        assert r.output_error <= r.plain_output_error + 1e-9
    assert report.mean_output_error < report.mean_plain_output_error
    assert "output error (plain proj.)" in str(report)
    calls = []
    structurize(net(), StructureConfig(structure="lowrank", budget=0.25, calibration=lambda mod: calls.append(mod(calib))))
    assert len(calls) == 1


def test_select_error_is_never_worse_than_select_params():
    a, b = net(), net()
    ra = structurize(a, StructureConfig(structure="monarch", budget=0.25, select="params", max_trials=1))
    rb = structurize(b, StructureConfig(structure="monarch", budget=0.25, select="error", slack=0.05))
    assert rb.mean_error <= ra.mean_error + 1e-9
    assert all(weight_after(r) <= 0.25 * weight_before(r) for r in rb.layers)


def test_failure_leaves_the_model_unchanged():
    m = net()
    before = copy.deepcopy(m.state_dict())
    types = [type(x) for x in m.modules()]
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.(query|value)'.*no dense hyperparameters fit budget"):
        structurize(m, StructureConfig(structure="monarch", budget=0.5, overrides={"value": {"structure": "dense"}}))
    assert [type(x) for x in m.modules()] == types
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown structure 'monarc'.*monarch"):
        StructureConfig(structure="monarc")
    with pytest.raises(ValueError, match="budget=1.5 is out of range"):
        StructureConfig(structure="lowrank", budget=1.5)
    with pytest.raises(TypeError, match="budget must be a number"):
        StructureConfig(structure="lowrank", budget="half")
    with pytest.raises(ValueError, match="budget_kind='bytes'"):
        StructureConfig(structure="lowrank", budget_kind="bytes")
    with pytest.raises(ValueError, match="has no hyperparameter 'nblocks'.*rank"):
        StructureConfig(structure="lowrank", hparams={"nblocks": 3})
    with pytest.raises(ValueError, match="init='zeros'"):
        StructureConfig(structure="lowrank", init="zeros")
    with pytest.raises(ValueError, match=r"overrides\['up'\].*no hyperparameter 'rnk'"):
        StructureConfig(structure="lowrank", overrides={"up": {"rnk": 2}})
    with pytest.raises(TypeError, match="target_modules=3"):
        StructureConfig(structure="lowrank", target_modules=3)
    with pytest.raises(ValueError, match="select='best'"):
        StructureConfig(structure="lowrank", select="best")
    with pytest.raises(TypeError, match="calibration must be"):
        StructureConfig(structure="lowrank", calibration=3)
    cfg = StructureConfig(structure="lowrank", target_modules=("a", "b"))
    assert cfg.target_modules == ["a", "b"]
    assert cfg.to_dict()["calibrated"] is False


# ---------------------------------------------------------------------------------------------- GPT-2 Conv1D
def gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


GPT_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def test_gpt2_conv1d_surgery():
    m = gpt2()
    ref = m(GPT_IDS).logits
    report = structurize(m, StructureConfig(structure="dense"))
    # all-linear skips the (tied) LM head; Conv1D weights (in, out) are transposed correctly
    assert [r.name for r in report.layers][:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                   "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert all(r.kind == "Conv1D" for r in report.layers)
    assert (report["transformer.h.0.attn.c_attn"].in_features, report["transformer.h.0.attn.c_attn"].out_features) \
        == (32, 96)
    assert "[Conv1D]" in str(report)
    assert m.lm_head.weight is m.transformer.wte.weight
    torch.testing.assert_close(m(GPT_IDS).logits, ref, rtol=1e-4, atol=1e-4)

    m = gpt2()
    report = structurize(m, StructureConfig(structure="monarch", budget=0.5))
    assert all(weight_after(r) <= 0.5 * weight_before(r) for r in report.layers)
    assert all(r.error < 1.0 for r in report.layers)
    out = m(GPT_IDS).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
