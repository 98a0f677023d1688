"""Latency budgets: candidates timed against nn.Linear (cached per machine and shape), the choice meets the
target at the least error, and structurize(budget_kind="latency") applies it per layer.

Selection logic is checked with a fake clock whose times are known (time = the candidate's FLOPs share, so
the right answer can be counted by hand); one real measurement checks the cache round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deftly
from deftly.surgery import latency


@pytest.fixture
def fake_clock(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path))
    calls = []

    def measure(structure, in_f, out_f, hp, opts):
        calls.append((structure, tuple(sorted(hp.items()))))
        flops = deftly.get(structure).flop_count(in_f, out_f, **hp)
        return flops / (2 * in_f * out_f), 1.0  # seconds (structured, dense): time share = FLOP share

    monkeypatch.setattr(latency, "_measure", measure)
    return calls


def test_choice_meets_the_target_with_the_most_parameters(fake_clock):
    best = latency.choose(64, 64, 0.3, ["lowrank", "blockdiag", "monarch"], latency.Latency(rows=8))
    assert best.time_fraction <= 0.3
    every = latency.candidates(64, 64, ["lowrank", "blockdiag", "monarch"], latency.Latency(rows=8))
    fitting = [c for c in every if c.time_fraction <= 0.3]
    assert best.params == max(c.params for c in fitting)


def test_choice_by_error_and_clear_refusal(fake_clock):
    errs = {"lowrank": 0.5, "blockdiag": 0.1, "monarch": 0.3}
    best = latency.choose(64, 64, 0.5, list(errs), latency.Latency(rows=8), error=lambda s, hp: errs[s])
    assert best.structure == "blockdiag"
    with pytest.raises(ValueError, match=r"no structure of \['blockdiag'\] reaches 0.01x"):
        latency.choose(64, 64, 0.01, ["blockdiag"], latency.Latency(rows=8), where="layer 'x'")


def test_timings_are_cached_per_machine_and_shape(fake_clock, tmp_path):
    opts = latency.Latency(rows=8)
    latency.candidates(32, 48, ["lowrank"], opts)
    n = len(fake_clock)
    assert n > 0
    latency.candidates(32, 48, ["lowrank"], opts)
    assert len(fake_clock) == n  # second time: from the cache
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert len(next(iter(cache.values()))) == n
    latency.candidates(32, 48, ["lowrank"], opts, remeasure=True)
    assert len(fake_clock) == 2 * n
    latency.clear()
    latency.candidates(32, 48, ["lowrank"], opts)
    assert len(fake_clock) == 3 * n


def test_structurize_with_a_latency_budget(fake_clock):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 5))
    x = torch.randn(4, 64)
    cfg = deftly.StructureConfig(structure=["lowrank", "monarch", "blockdiag"], budget=0.4,
                                 budget_kind="latency", latency=latency.Latency(rows=8), init="project")
    report = deftly.structurize(model, cfg)
    assert [r.name for r in report.layers] == ["0", "2"]
    for r in report.layers:
        layer = model.get_submodule(r.name)
        assert layer.flops() <= 0.4 * 2 * r.in_features * r.out_features  # the fake clock's time share
        assert r.structure == layer.name in ("lowrank", "monarch", "blockdiag")
    assert torch.isfinite(model(x)).all()


def test_measuring_prints_progress_and_the_cache_is_silent(fake_clock, capsys):
    """Timing shapes takes ~1 s per candidate: a latency budget (and `deftly plan --speed`) on a fresh cache
    says what it is timing, on stderr; served from the cache it prints nothing."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    cfg = deftly.StructureConfig(structure=["lowrank"], budget=0.5, budget_kind="latency",
                                 latency=latency.Latency(rows=8), init="random", target_modules=["0"])
    deftly.structurize(model, cfg)
    err = capsys.readouterr().err
    assert len(fake_clock) > 0 and err.count("latency: timing lowrank") == len(fake_clock)
    assert "at 64x64, 8 rows" in err
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    deftly.structurize(model, cfg)
    assert capsys.readouterr().err == ""


def test_latency_config_errors():
    with pytest.raises(ValueError, match="needs a budget"):
        deftly.StructureConfig(structure="monarch", budget_kind="latency")
    with pytest.raises(ValueError, match="unknown structure 'monarh'"):
        deftly.StructureConfig(structure=["monarh"], budget=0.5, budget_kind="latency")
    with pytest.raises(ValueError, match="drop hparams"):
        deftly.StructureConfig(structure="monarch", budget=0.5, budget_kind="latency", hparams={"rank": 2})
    with pytest.raises(ValueError, match="rows=0"):
        latency.Latency(rows=0)


def test_one_real_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path))
    cands = latency.candidates(32, 32, ["lowrank"], latency.Latency(rows=4, seconds=0.01, ladder=(0.25,)))
    assert len(cands) == 1 and cands[0].seconds > 0 and cands[0].dense_seconds > 0
    assert cands[0].hparams == {"rank": 4}
