"""The training loop and the recipes under ``torchrun`` (issue #7): DDP and FSDP2 on CPU with gloo.

Real launches (``python -m torch.distributed.run --standalone --nproc_per_node=2``) of this file as a
worker, on a real slice of Fashion-MNIST:

* a DDP run killed after its step-4 checkpoint resumes in ONE process and ends with exactly the
  parameters of an uninterrupted single-process run (a distributed checkpoint loads in one process);
* a single-process run killed after its step-4 checkpoint resumes under FSDP2 on 2 ranks and ends the
  same (a single-process checkpoint loads into a sharded model, and FSDP2 steps equal one process's);
* ``deftly train fashion-mnist --strategy ddp`` (the CLI recipe) under torchrun gives the same table
  and checkpoint as the same command in one process; ``deftly train charlm --strategy fsdp2`` likewise
  for its dense model.

The models hold a Monarch and a butterfly layer (structured factors with a tiny dim 0) next to dense
layers, with per-factor learning rates and gradient clipping, so every part of the loop is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

STEPS, STOP_AFTER, GLOBAL_BATCH = 8, 5, 32
ROOT = Path(__file__).resolve().parents[1]


def _data():
    from deftly.data import fashion_mnist

    return fashion_mnist.tensors("train", limit=256)


def _model() -> nn.Module:
    import deftly

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.GELU(),
                         deftly.make("monarch", 64, 64, nblocks=4), nn.GELU(),
                         deftly.make("butterfly", 64, 48, depth=2), nn.GELU(), nn.Linear(48, 10))


class _Killed(Exception):
    pass


def _train(ckpt: Path, strategy: str, stop_after: int | None, resume: bool) -> int | None:
    """Train STEPS steps (checkpoint every 2), raising after step ``stop_after`` like a killed job;
    returns the step it resumed from (``None``: started afresh or was killed)."""
    from deftly.train.loop import TrainConfig, epoch_batches, train

    x, y = _data()
    idx = epoch_batches(len(x), GLOBAL_BATCH, seed=0)

    def get_batch(step):
        i = idx(step)
        return x[i], y[i]

    def stop(step, _loss):
        if stop_after is not None and step == stop_after:
            raise _Killed(step)

    cfg = TrainConfig(steps=STEPS, lr=3e-3, warmup=2, checkpoint_every=2, progress=False, grad_clip=0.5)
    model = _model()
    try:
        res = train(model, get_batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]), cfg, checkpoint_path=ckpt,
                    resume=resume, strategy=strategy, on_step=stop, exclude_from_mup=(model[1], model[-1]))
    except _Killed:
        return None
    return res.resumed_from


def _worker(argv: list[str]) -> int:
    from deftly import distributed as ddist

    strategy, ckpt, stop_after, resume = argv[0], Path(argv[1]), argv[2], argv[3] == "resume"
    torch.set_num_threads(1)
    ddist.setup("gloo")
    try:
        resumed = _train(ckpt, strategy, None if stop_after == "none" else int(stop_after), resume)
        if ddist.is_main():
            ckpt.with_suffix(".resumed").write_text(json.dumps(resumed))
    finally:
        ddist.teardown()
    return 0


def _torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted single-process run."""
    try:
        _data()
    except (FileNotFoundError, ImportError) as err:  # pragma: no cover - the set-up installs it
        pytest.skip(str(err))
    from deftly.io.checkpoint import load_checkpoint

    path = tmp_path_factory.mktemp("single") / "run.ckpt"
    _train(path, "none", None, False)
    return load_checkpoint(path)


def _assert_same_run(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] == STEPS
    assert sorted(got["model"]) == sorted(want["model"])
    for k, v in want["model"].items():
        torch.testing.assert_close(got["model"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for name, s in want["optimizer"]["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(got["optimizer"]["state"][name][k], v, rtol=0, atol=1e-5)
    assert got["losses"] == pytest.approx(want["losses"], abs=1e-5)


def test_ddp_checkpoint_resumes_in_one_process(single, tmp_path):
    from deftly.io.checkpoint import load_checkpoint

    path = tmp_path / "run.ckpt"
    _torchrun(__file__, "ddp", str(path), str(STOP_AFTER), "fresh")
    mid = load_checkpoint(path)
    assert mid["step"] == 4  # the last checkpoint before the kill
    assert isinstance(next(iter(mid["optimizer"]["state"])), str)  # keyed by parameter name
    assert _train(path, "none", None, True) == 4
    _assert_same_run(load_checkpoint(path), single)


def test_single_process_checkpoint_resumes_under_fsdp2(single, tmp_path):
    from deftly.io.checkpoint import load_checkpoint

    path = tmp_path / "run.ckpt"
    _train(path, "none", STOP_AFTER, False)
    assert load_checkpoint(path)["step"] == 4
    _torchrun(__file__, "fsdp2", str(path), "none", "resume")
    assert json.loads(path.with_suffix(".resumed").read_text()) == 4
    _assert_same_run(load_checkpoint(path), single)


def test_cli_recipe_under_torchrun_equals_one_process(tmp_path):
    try:
        _data()
    except (FileNotFoundError, ImportError) as err:  # pragma: no cover
        pytest.skip(str(err))
    from deftly.io.checkpoint import load_checkpoint
    from deftly.cli import main

    args = ["train", "fashion-mnist", "--structures", "dense,monarch", "--train-limit", "512", "--test-limit",
            "256", "--epochs", "1", "--width", "64", "--batch-size", "64", "--threads", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun("-m", "deftly", *args, "--strategy", "ddp", "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert two["config"]["strategy"] == "ddp" and two["config"]["world_size"] == 2
    for a, b in zip(one["rows"], two["rows"]):
        assert a["structure"] == b["structure"] and a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9)
        sa = load_checkpoint(tmp_path / "one" / a["structure"] / "checkpoint.safetensors")["model"]
        sb = load_checkpoint(tmp_path / "ddp" / a["structure"] / "checkpoint.safetensors")["model"]
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-5)


def test_charlm_recipe_under_torchrun(tmp_path):
    """``deftly train charlm --strategy fsdp2`` on 2 ranks: dense (a fixed number of steps) ends with the
    parameters of the one-process run; the structured row is there (its length follows rank 0's timing)."""
    from deftly.data import wikipedia

    try:
        wikipedia.char_splits(limit=30_000)
    except (FileNotFoundError, ImportError) as err:  # pragma: no cover - the set-up installs gensim
        pytest.skip(str(err))
    from deftly.io.checkpoint import load_checkpoint
    from deftly.cli import main

    args = ["train", "charlm", "--structures", "dense,blockdiag", "--steps", "4", "--eval-every", "2",
            "--eval-windows", "4", "--text-limit", "30000", "--layers", "1", "--dim", "32", "--heads", "2",
            "--ctx", "16", "--batch-size", "8", "--threads", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun("-m", "deftly", *args, "--strategy", "fsdp2", "--out", str(tmp_path / "two"), cwd=tmp_path)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["structure"] for r in two["rows"]] == ["dense", "blockdiag"]
    assert two["config"]["strategy"] == "fsdp2" and two["config"]["world_size"] == 2
    a = load_checkpoint(tmp_path / "one" / "dense" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "two" / "dense" / "checkpoint.safetensors")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5)


def test_strategy_without_torchrun_is_a_clear_error(tmp_path, capsys):
    from deftly.cli import main

    assert main(["train", "fashion-mnist", "--strategy", "fsdp2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "--strategy fsdp2" in err and len(err.strip().splitlines()) == 1


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
