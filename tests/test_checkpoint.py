"""deftly.io.checkpoint: round trips, atomic writes, corrupt files, and kill-and-resume of a real training run."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deftly.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

safetensors = pytest.importorskip("safetensors")


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
        "python_rng": random.getstate(), "step": 17, "loss": 0.25, "best": math.inf, "nan": float("nan"),
        "config": {"name": "x", "sizes": (1, 2), "flags": [True, None]}, "by_int": {3: torch.arange(3)},
        "bf16": torch.ones(2, 2, dtype=torch.bfloat16), "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5),
        "np": np.arange(4, dtype=np.float32)}


def test_round_trip_preserves_types_values_and_optimizer_state(tmp_path):
    model, opt, state = _state()
    path = save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(path)
    assert back["step"] == 17 and back["loss"] == 0.25 and back["best"] == math.inf and math.isnan(back["nan"])
    assert back["config"] == {"name": "x", "sizes": (1, 2), "flags": [True, None]}
    assert isinstance(back["config"]["sizes"], tuple)
    assert list(back["by_int"]) == [3] and torch.equal(back["by_int"][3], torch.arange(3))
    assert back["bf16"].dtype == torch.bfloat16 and back["empty"].shape == (0, 4)
    assert back["scalar"].shape == () and float(back["scalar"]) == 2.5
    assert torch.equal(back["np"], torch.arange(4, dtype=torch.float32))
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert torch.equal(back["rng"], state["rng"])
    random.setstate(back["python_rng"])  # the tuple structure survives
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # int-keyed state and param groups survive
    assert set(opt2.state_dict()["state"]) == set(opt.state_dict()["state"])
    # the file is a plain safetensors file too
    from safetensors.torch import load_file

    assert "model/0.weight" in load_file(str(path))


def test_unsupported_values_are_refused_with_their_location(tmp_path):
    with pytest.raises(TypeError, match="config/obj.*object"):
        save_checkpoint(tmp_path / "c.safetensors", {"config": {"obj": object()}})
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint(tmp_path / "c.safetensors", [1, 2])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "flip_byte", "garbage", "empty"])
def test_corrupt_files_raise_a_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "run" / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.arange(1000, dtype=torch.float32), "step": 3})
    raw = bytearray(path.read_bytes())
    if damage == "truncate_data":
        raw = raw[:-100]
    elif damage == "truncate_header":
        raw = raw[:20]
    elif damage == "flip_byte":
        raw[-10] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"this is not a checkpoint at all" * 3)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert "corrupt" in str(err.value) or "truncated" in str(err.value) or "not a" in str(err.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a deftly checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


# ------------------------------------------------------------------ kill -9 in the middle, then resume
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import deftly
    from deftly.data import fashion_mnist
    from deftly.train.loop import TrainConfig, epoch_batches, train
    from deftly.io.checkpoint import save_checkpoint
    ckpt, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    x, y = fashion_mnist.tensors("train", limit=512)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.GELU(), deftly.make("blockdiag", 64, 64, nblocks=4),
                                torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))
    idx = epoch_batches(len(x), 64, seed=1)
    res = train(model, lambda s: (x[idx(s)], y[idx(s)]),
                lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                TrainConfig(steps=40, lr=3e-3, warmup=5, checkpoint_every=4, eval_every=10, progress=False, seed=1),
                evaluate=lambda m: {"acc": float((m(x[:128]).argmax(1) == y[:128]).float().mean())},
                checkpoint_path=ckpt, resume=resume, on_step=lambda s, l: time.sleep(delay))
    save_checkpoint(out, {"model": model.state_dict(), "losses": res.losses, "history": res.history,
                          "resumed_from": res.resumed_from})
""")


def _run(script: Path, ckpt: Path, out: Path, resume: bool, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), "1" if resume else "0", str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    pytest.importorskip("deftly.data.fashion_mnist")
    from deftly.data import MissingDataError, fashion_mnist

    try:
        fashion_mnist.load("train", limit=1)
    except MissingDataError as err:
        pytest.skip(str(err))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ref_ckpt, ref_out = tmp_path / "ref.safetensors", tmp_path / "ref_out.safetensors"
    ref = _run(script, ref_ckpt, ref_out, resume=False, delay=0.0)

    ckpt, out = tmp_path / "k.safetensors", tmp_path / "k_out.safetensors"
    victim = _run(script, ckpt, out, resume=False, delay=0.1)
    deadline = time.time() + 60
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists():
            try:
                step = load_checkpoint(ckpt)["step"]
            except (CheckpointError, OSError):  # pragma: no cover - atomic writes make this unreachable
                step = 0
            if 8 <= step < 40:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                killed_at = step
                break
        time.sleep(0.05)
    assert killed_at is not None, f"run was not killed mid-way: {victim.communicate()}"
    assert victim.returncode == -signal.SIGKILL and not out.exists()
    resumed = _run(script, ckpt, out, resume=True, delay=0.0)
    _, r_err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, r_err
    _, f_err = ref.communicate(timeout=120)
    assert ref.returncode == 0, f_err

    a, b = load_checkpoint(ref_out), load_checkpoint(out)
    assert b["resumed_from"] is not None and b["resumed_from"] >= killed_at
    assert a["losses"] == b["losses"]  # every step's loss, bit for bit
    assert a["history"] == [{**h, "train_time": a["history"][i]["train_time"]} for i, h in enumerate(b["history"])]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_index_keyed_optimizer_state_is_refused_with_the_file_named(tmp_path):
    """Checkpoints from before name-keyed optimizer states cannot be checked against the model: a clear
    error naming the file, and nothing loaded."""
    from torch import nn

    from deftly.train.loop import _load_state

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = nn.Linear(3, 2)
    state = {"model": other.state_dict(), "optimizer": opt.state_dict(), "rng": {}, "step": 1, "train_time": 0.0,
             "history": [], "losses": []}
    ckpt = tmp_path / "old.safetensors"
    with pytest.raises(ValueError, match="index-keyed") as info:
        _load_state(state, ckpt, model, opt)
    assert str(ckpt) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
