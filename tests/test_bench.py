"""The benchmark suite end to end on a tiny grid: fields, ratios, targets, outputs, CLI wiring."""

from __future__ import annotations

import json
import math

import pytest
import torch

import deftly
from deftly import bench


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


def test_ratios_are_computed_from_the_fields(tiny):
    result, _, _ = tiny
    for r in result["rows"]:
        layer = bench.build(r["structure"].split("@")[0].split("[")[0], r["in"], r["out"], torch.float32,
                            **({"init": "fft"} if "[fft]" in r["structure"] else {}))
        mult = 3 if r["mode"] == "fwdbwd" else 1
        assert r["flops"] == layer.flops(r["batch"]) * mult
        assert r["dense_flops"] == 2 * r["in"] * r["out"] * r["batch"] * mult
        assert math.isclose(r["ideal"], r["dense_flops"] / r["flops"], rel_tol=1e-12)
        assert math.isclose(r["speedup"], r["dense_time_ms"] / r["time_ms"], rel_tol=1e-12)
        assert math.isclose(r["fraction"], r["speedup"] / r["ideal"], rel_tol=1e-12)
        assert math.isclose(r["fraction"], r["gflops"] / r["dense_gflops"], rel_tol=1e-9)
        assert math.isclose(r["gflops"], r["flops"] / (r["time_ms"] / 1e3) / 1e9, rel_tol=1e-12)
        assert r["time_ms"] > 0 and r["dense_time_ms"] > 0 and r["samples"] >= 2
        if r["mode"] == "fwdbwd":
            assert r["peak_mem_bytes"] >= 0 and r["dense_peak_mem_bytes"] > 0
        else:
            assert r["peak_mem_bytes"] is None
        assert r["backend"]


def test_hparams_used_are_reported(tiny):
    result, _, _ = tiny
    hp = result["meta"]["hparams"]
    assert hp["monarch@16x16"]["nblocks"] == 4 and hp["blockdiag@16x16"]["nblocks"] == 4
    assert bench.bench_hparams("monarch", 4096, 4096) == {"nblocks": 64}
    assert bench.bench_hparams("blockdiag", 4096, 4096) == {"nblocks": 64}
    assert bench.bench_hparams("blockdiag", 1024, 4096) == {"nblocks": 32}
    assert bench.bench_hparams("lowrank", 4096, 4096) == {}


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
    assert "nn.Linear ms" in text and "targets:" in text and "% ideal" in text
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
    t = {x["target"].split(":")[0]: x for x in bench.evaluate_targets(rows)}
    assert [x["met"] for x in t.values()] == [True, False, True, False, True]
    assert "1/2 rows" in t["no structure slower than nn.Linear at batch 1 (every size, dtype, mode; dispatch on)"][
        "measured"]
    assert all(x["met"] is None for x in bench.evaluate_targets([]) if "batch 1" not in x["target"])


def test_measure_and_peak_memory():
    m = bench.measure(lambda: torch.ones(10).sum(), min_run_time=0.01, min_samples=2)
    assert m["median"] > 0 and m["samples"] >= 2
    x = torch.randn(256, 256)
    assert bench.peak_memory(lambda: (x @ x) @ x) >= 2 * 256 * 256 * 4  # two 256 KB results live at once


def test_cli_parses_and_validates():
    from deftly.cli import build_parser

    args = build_parser().parse_args(["bench", "--sizes", "16x16", "--batches", "1", "--structures", "monarch",
                                      "--no-peers", "--min-run-time", "0.01"])
    cfg = bench.config_from_args(args)
    assert cfg.sizes == [(16, 16)] and cfg.batches == [1] and cfg.structures == ["monarch"] and not cfg.peers
    full = bench.config_from_args(build_parser().parse_args(["bench", "--full"]))
    assert full.sizes == [(1024, 1024), (4096, 4096), (1024, 4096)] and full.peers and full.backends
    with pytest.raises(ValueError, match="INxOUT"):
        bench.config_from_args(build_parser().parse_args(["bench", "--sizes", "16"]))
    with pytest.raises(ValueError, match="unknown structure"):
        bench.config_from_args(build_parser().parse_args(["bench", "--structures", "monarc"]))
    assert "dense" not in [c[0] for c in bench._cases(bench.BenchConfig(structures=deftly.structures()))]
