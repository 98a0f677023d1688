"""The benchmark suite end to end on a tiny grid: fields, ratios, targets, outputs, CLI wiring."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import deftly
from deftly import bench
from deftly.bench import cli as bench_cli
from deftly.bench import config as bench_config
from deftly.bench import suite as bench_suite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from targets import evaluate_targets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = bench.BenchConfig(sizes=[(16, 16), (8, 24)], batches=[1, 4], structures=["monarch", "blockdiag",
                            "butterfly", "lowrank"], backends=True, min_run_time=0.002, min_samples=2)
    result = bench.run(cfg, log=lambda s: None)
    prefix = str(tmp_path_factory.mktemp("bench") / "bench")
    paths = bench.write(result, prefix)
    return result, prefix, paths


def test_rows_cover_the_grid(tiny):
    result, _, _ = tiny
    rows = result["rows"]
    labels = {r["structure"] for r in rows}
    assert {"monarch", "blockdiag", "butterfly", "lowrank", "butterfly[fft]", "monarch@native",
            "monarch@kernel", "blockdiag@kernel"} <= labels
    for label in ("monarch", "blockdiag", "lowrank"):
        got = {(r["size"], r["batch"], r["mode"]) for r in rows if r["structure"] == label}
        assert got == {(s, b, m) for s in ("16x16", "8x24") for b in (1, 4) for m in ("fwd", "fwdbwd")}
    assert not any(r["structure"] == "butterfly[fft]" and r["size"] == "8x24" for r in rows)  # square only


def test_ratios_against_known_times_and_counts(monkeypatch):
    """A fake clock: every structured call takes 2 ms and every nn.Linear call 8 ms, so each row's ratios
    are known answers: FLOPs counted by hand (dense 2*in*out per row; monarch/blockdiag from their block
    sizes), speed-up exactly 4, GFLOP/s = FLOPs / 2 ms."""
    def fake_pair(fa, fb, min_run_time=0.3, min_samples=3):
        return ({"median": 2e-3, "min": 2e-3, "samples": 5, "number": 1},
                {"median": 8e-3, "min": 8e-3, "samples": 5, "number": 1})

    monkeypatch.setattr(bench_suite, "measure_pair", fake_pair)
    cfg = bench.BenchConfig(sizes=[(16, 16), (8, 24)], batches=[1, 4], structures=["monarch", "blockdiag"],
                            backends=False, fft=False, memory=False, min_run_time=0.002, min_samples=2)
    rows = bench.run(cfg, log=lambda s: None)["rows"]
    # hand counts: monarch 16x16 with 4 blocks of 4 (rank 1): R and L have 4*4*4 entries each -> 2*128 FLOPs;
    # blockdiag 16x16 4 blocks of 4x4: 64 entries -> 128 FLOPs; 8x24 with 2 blocks (sqrt(min) = 2): 2*(4*12)
    hand = {("monarch", "16x16"): 256, ("blockdiag", "16x16"): 128, ("blockdiag", "8x24"): 192}
    seen = 0
    for r in rows:
        mult = 3 if r["mode"] == "fwdbwd" else 1
        dense = 2 * r["in"] * r["out"] * r["batch"] * mult
        assert r["dense_flops"] == dense
        if (r["structure"], r["size"]) in hand:
            seen += 1
            assert r["flops"] == hand[r["structure"], r["size"]] * r["batch"] * mult
        assert r["time_ms"] == pytest.approx(2.0) and r["dense_time_ms"] == pytest.approx(8.0)
        assert r["speedup"] == pytest.approx(4.0)
        assert r["gflops"] == pytest.approx(r["flops"] / 2e-3 / 1e9)
        assert r["dense_gflops"] == pytest.approx(dense / 8e-3 / 1e9)
        assert r["ideal"] == pytest.approx(dense / r["flops"])
        assert r["fraction"] == pytest.approx(4.0 * r["flops"] / dense)
        assert r["peak_mem_bytes"] is None and r["backend"]
    assert seen == 12  # 3 (structure, size) pairs x 2 batches x 2 modes


def test_rows_report_measured_memory(tiny):
    result, _, _ = tiny
    for r in result["rows"]:
        if r["mode"] == "fwdbwd":
            assert r["peak_mem_bytes"] >= 0 and r["dense_peak_mem_bytes"] > 0
        else:
            assert r["peak_mem_bytes"] is None
        assert r["time_ms"] > 0 and r["dense_time_ms"] > 0 and r["samples"] >= 2


def test_hparams_used_are_reported(tiny):
    result, _, _ = tiny
    hp = result["meta"]["hparams"]
    assert hp["monarch@16x16"]["nblocks"] == 4 and hp["blockdiag@16x16"]["nblocks"] == 4
    assert bench_config.bench_hparams("monarch", 4096, 4096) == {"nblocks": 64}
    assert bench_config.bench_hparams("blockdiag", 4096, 4096) == {"nblocks": 64}
    assert bench_config.bench_hparams("blockdiag", 1024, 4096) == {"nblocks": 32}
    assert bench_config.bench_hparams("lowrank", 4096, 4096) == {}


def test_meta_and_outputs(tiny):
    result, prefix, paths = tiny
    meta = result["meta"]
    for k in ("torch", "threads", "allocator", "load_start", "load_end", "cpu", "hparams"):
        assert k in meta
    assert meta["allocator"].startswith(("glibc", "tcmalloc", "jemalloc"))
    assert paths == [prefix + ".json", prefix + ".txt", prefix + ".png"]
    with open(prefix + ".json") as f:
        again = json.load(f)
    assert len(again["rows"]) == len(result["rows"])
    with open(prefix + ".txt") as f:
        text = f.read()
    assert "nn.Linear ms" in text and "% ideal" in text  # targets: only with benchmarks/bench.py
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _row(**kw):
    base = {"structure": "monarch", "size": "4096x4096", "batch": 2048, "dtype": "float32", "mode": "fwdbwd",
            "speedup": 20.0, "fraction": 0.6, "ideal": 32.0, "time_ms": 50.0, "dense_time_ms": 1000.0,
            "gflops": 100.0, "dense_gflops": 200.0, "hparams": {"nblocks": 64}, "backend": "kernel"}
    return {**base, **kw}


def test_targets_evaluated():
    rows = [_row(), _row(structure="blockdiag", fraction=0.65, speedup=41.6, ideal=64.0),
            _row(structure="blockdiag", batch=64, fraction=0.8),
            _row(structure="lowrank", batch=1, speedup=3.0), _row(structure="butterfly", batch=1, speedup=0.5),
            _row(structure="monarch@native", batch=1, speedup=0.1),  # forced backends do not count
            _row(structure="butterfly[fft]", batch=64, mode="fwd", time_ms=2.5)]
    t = {x["target"].split(":")[0]: x for x in evaluate_targets(rows)}
    assert [x["met"] for x in t.values()] == [True, False, True, False, True, None]
    assert "1/2 rows" in t["no structure slower than nn.Linear at batch 1 (every size, dtype, mode; dispatch on)"][
        "measured"]
    assert all(x["met"] is None for x in evaluate_targets([]) if "batch 1" not in x["target"])


def test_fly_target():
    kw = {"hparams": {"nblocks": 64, "out_blocks": 64, "rank": 1}}
    rows = [r for b in (1, 64, 2048) for r in (_row(batch=b, speedup=3.0, **kw),
                                                  _row(structure="fly.monarch", batch=b, speedup=1.0, **kw))]
    fly = [x for x in evaluate_targets(rows) if "fly's" in x["target"]]
    assert fly[0]["met"] is True and fly[0]["measured"].count("3.00x") == 3
    rows[-1]["speedup"] = 2.0  # batch 2048: 1.5x
    assert [x["met"] for x in evaluate_targets(rows) if "fly's" in x["target"]] == [False]
    assert [x["met"] for x in evaluate_targets(rows[:2]) if "fly's" in x["target"]] == [None]  # batches missing


def test_measure_and_peak_memory():
    m = bench.measure(lambda: torch.ones(10).sum(), min_run_time=0.01, min_samples=2)
    assert m["median"] > 0 and m["samples"] >= 2
    x = torch.randn(256, 256)
    assert bench.peak_memory(lambda: (x @ x) @ x) >= 2 * 256 * 256 * 4  # two 256 KB results live at once


def test_cli_parses_and_validates():
    from deftly.cli import build_parser

    args = build_parser().parse_args(["bench", "--sizes", "16x16", "--batches", "1", "--structures", "monarch",
                                      "--no-peers", "--min-run-time", "0.01"])
    cfg = bench_cli.config_from_args(args)
    assert cfg.sizes == [(16, 16)] and cfg.batches == [1] and cfg.structures == ["monarch"] and not cfg.peers
    full = bench_cli.config_from_args(build_parser().parse_args(["bench", "--full"]))
    assert full.sizes == [(1024, 1024), (4096, 4096), (1024, 4096)] and full.peers and full.backends
    with pytest.raises(ValueError, match="INxOUT"):
        bench_cli.config_from_args(build_parser().parse_args(["bench", "--sizes", "16"]))
    with pytest.raises(ValueError, match="unknown structure"):
        bench_cli.config_from_args(build_parser().parse_args(["bench", "--structures", "monarc"]))
    assert "dense" not in [c[0] for c in bench_suite._cases(bench.BenchConfig(structures=deftly.structures()))]
