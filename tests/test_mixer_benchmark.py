"""The mixer scaling benchmark runs end to end in its --quick mode and writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mixer_scaling_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ms"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixer_scaling.py"), "--quick", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(Path(str(out) + ".json").read_text())
    assert set(data["times"]) == {"mixer[torch]", "mixer[monarch]", "conv[torch]", "conv[monarch]", "sdpa"}
    worst = max(max(r[p] for p in ("torch", "monarch", "butterfly")) for r in data["exactness"]["rows"])
    assert worst < 1e-12
    assert all(c["nonzero_future_gradients"] == 0 for c in data["exactness"]["causality"].values())
    for it, e in data["summary"]["exponents"].items():
        assert e["fwdbwd_s"]["exponent_per_sequence"] is not None, it
    mem = data["memory"]
    assert mem and all("fwdbwd_mib" in v for v in mem.values()), mem
    md = Path(str(out) + ".md").read_text()
    assert "Fitted exponents" in md and "Crossover" in md and "| 1024 |" in md
    assert Path(str(out) + ".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
