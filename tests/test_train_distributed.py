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


def _torchrun(*args: str, cwd: Path | None = None, keep: tuple[Path, ...] = (), fresh: tuple[Path, ...] = (),
              attempts: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (its rendezvous store binds port 0 itself: no
    free-port race). A failed launch is retried once from the same starting point: the files in ``keep``
    are restored to their state before the first attempt and the paths in ``fresh`` removed; the failed
    attempt's output is shown (a warning when the retry passes, in the error when it fails too)."""
    import shutil
    import warnings

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    saved = {p: p.read_bytes() for p in keep if p.exists()}
    failed: list[str] = []
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            for p in keep:
                if p in saved:
                    p.write_bytes(saved[p])
                else:
                    p.unlink(missing_ok=True)
            for p in fresh:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        try:
            res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)
        except subprocess.TimeoutExpired as err:  # a hang guard only
            failed.append(f"timed out after {err.timeout:.0f} s:\n{(err.stdout or '')[-3000:]}\n"
                          f"{(err.stderr or '')[-5000:]}")
            continue
        if res.returncode == 0:
            if failed:
                warnings.warn(f"{' '.join(cmd)}: attempt 1 failed and was retried (attempt {attempt} passed); its "
                              f"output:\n{failed[0]}", stacklevel=2)
            return res
        failed.append(f"exit status {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    raise AssertionError(f"{' '.join(cmd)} failed {attempts} times:\n" + "\n=====\n".join(
        f"attempt {i + 1}: {text}" for i, text in enumerate(failed)))


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
    _torchrun(__file__, "ddp", str(path), str(STOP_AFTER), "fresh", fresh=(path, path.with_suffix(".resumed")))
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
    _torchrun(__file__, "fsdp2", str(path), "none", "resume", keep=(path,), fresh=(path.with_suffix(".resumed"),))
    assert json.loads(path.with_suffix(".resumed").read_text()) == 4
    _assert_same_run(load_checkpoint(path), single)


def test_cli_recipe_under_torchrun_equals_one_process(tmp_path):
    try:
        _data()
    except (FileNotFoundError, ImportError) as err:  # pragma: no cover
        pytest.skip(str(err))
    from deftly.cli import main
    from deftly.io.checkpoint import load_checkpoint

    args = ["train", "fashion-mnist", "--structures", "dense,monarch", "--train-limit", "512", "--test-limit",
            "256", "--epochs", "1", "--width", "64", "--batch-size", "64", "--threads", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun("-m", "deftly", *args, "--strategy", "ddp", "--out", str(tmp_path / "ddp"), cwd=tmp_path,
              fresh=(tmp_path / "ddp",))
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
    from deftly.cli import main
    from deftly.io.checkpoint import load_checkpoint

    args = ["train", "charlm", "--structures", "dense,blockdiag", "--steps", "4", "--eval-every", "2",
            "--eval-windows", "4", "--text-limit", "30000", "--layers", "1", "--dim", "32", "--heads", "2",
            "--ctx", "16", "--batch-size", "8", "--threads", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _torchrun("-m", "deftly", *args, "--strategy", "fsdp2", "--out", str(tmp_path / "two"), cwd=tmp_path,
              fresh=(tmp_path / "two",))
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["structure"] for r in two["rows"]] == ["dense", "blockdiag"]
    assert two["config"]["strategy"] == "fsdp2" and two["config"]["world_size"] == 2
    a = load_checkpoint(tmp_path / "one" / "dense" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "two" / "dense" / "checkpoint.safetensors")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5)


def test_torchrun_retry_restores_the_starting_point(tmp_path, monkeypatch):
    """The retry of a failed launch starts from the same files: ``keep`` restored, ``fresh`` removed; the
    first attempt's output is in the warning. The launch here is a stand-in script (first call fails after
    changing both files), run through the real helper."""
    kept, made = tmp_path / "ckpt.bin", tmp_path / "out"
    kept.write_bytes(b"step-4")
    script = tmp_path / "fake.py"
    script.write_text("import pathlib, sys\n"
                      f"kept, made, flag = pathlib.Path({str(kept)!r}), pathlib.Path({str(made)!r}), "
                      f"pathlib.Path({str(tmp_path / 'flag')!r})\n"
                      "first = not flag.exists(); flag.write_text('x')\n"
                      "if first:\n"
                      "    kept.write_bytes(b'step-6'); made.mkdir(); (made / 'partial').write_text('x')\n"
                      "    print('MARKER first attempt'); sys.exit(5)\n"
                      "assert kept.read_bytes() == b'step-4' and not made.exists(), 'not restored'\n"
                      "made.mkdir(); (made / 'done').write_text(kept.read_text())\n")
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kw):  # the helper's own retry logic, a one-process stand-in for torchrun
        calls.append(cmd)
        return real_run([sys.executable, str(script)], **kw)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.warns(UserWarning, match=r"(?s)attempt 1 failed.*MARKER first attempt"):
        _torchrun("whatever", keep=(kept,), fresh=(made,))
    assert len(calls) == 2 and (made / "done").read_text() == "step-4"


def test_strategy_without_torchrun_is_a_clear_error(tmp_path, capsys):
    from deftly.cli import main

    assert main(["train", "fashion-mnist", "--strategy", "fsdp2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "--strategy fsdp2" in err and len(err.strip().splitlines()) == 1


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
