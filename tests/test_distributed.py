"""DDP and FSDP2 on 2 CPU processes (gloo, 127.0.0.1) give the single-process result, for every structure.

One launch of 2 worker processes runs every registered structure under both strategies (process start-up
dominates on 2 cores). The workers are this file run as a script with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT), i.e. exactly the code path of
``torchrun --nproc_per_node=2`` without the launcher's own start-up.

For each case (a structure with its first ``examples()`` entry, plus the first example of every other
parameter-dtype signature, e.g. a complex butterfly; plus a test-only layer with an odd-sized complex
weight, a 0-d parameter, an unused parameter, mixed dtypes and a Parameter attribute):

* this process trains the two-layer model 3 AdamW steps on the global batch (reference), saves that
  state as a single-process checkpoint, then takes a 4th step;
* the workers train the same model 3 steps on their half of each batch under DDP and under FSDP2 and save
  the gathered state (rank 0) as a checkpoint; then they load the single-process checkpoint (model and
  optimizer) into a freshly wrapped model and take the 4th step;
* the tests here load the distributed checkpoints in this single process and compare: parameters equal the
  reference to 1e-5 after 3 steps, the distributed optimizer state resumes here to the reference 4th step,
  and the distributed run resumed from the single-process checkpoint reaches the same 4th step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import deftly
from deftly import distributed as ddist
from deftly.core.base import StructuredLinear, init_uniform_

IN, HID, OUT = 12, 20, 6
GLOBAL_BATCH = 8
STEPS = 3
LR = 1e-2
TOL = 1e-5
STRATEGIES = ("ddp", "fsdp2")
WORKER_TIMEOUT_S = 240


# --------------------------------------------------------------------------- checkpoint I/O
def save(path, state):
    from deftly.io.checkpoint import save_checkpoint

    save_checkpoint(path, state)


def load(path):
    from deftly.io.checkpoint import load_checkpoint

    return load_checkpoint(path)


# --------------------------------------------------------------------------- a test-only layer
class ToyHazards(StructuredLinear):
    """Not registered. Everything FSDP2/DDP trip on: a complex weight whose dim 0 (out_features=5 or 6,
    odd shard on 2 ranks for 5) is uneven, a real bias next to it (mixed dtypes), a 0-d gain, a parameter
    the forward never uses, and an attribute set on a Parameter object."""

    name = "toy-hazards"

    def __init__(self, in_features, out_features, bias=True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        real = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=real.to_complex()))
        self.gain = nn.Parameter(torch.tensor(1.0, dtype=real))
        self.unused = nn.Parameter(torch.zeros(3, dtype=real))
        self.weight.lr_scale = 0.5
        self.reset_parameters()

    def _reset_structure(self):
        init_uniform_(self.weight, 1.0 / (3.0 * self.in_features))
        with torch.no_grad():
            self.gain.fill_(1.25)

    def _matmul(self, x):
        return (x.to(self.weight.dtype) @ self.weight.T).real * self.gain

    _reference_matmul = _matmul

    def to_dense(self):
        return self.weight.real * self.gain


def _cases() -> list[dict]:
    cases = []
    for name in deftly.structures():
        cls = deftly.get(name)
        seen = set()
        for i, params in enumerate(cls.examples(IN, HID)):
            sig = tuple(sorted(str(p.dtype) for p in deftly.make(name, IN, HID, **params).parameters()))
            if sig in seen:
                continue
            seen.add(sig)
            second = cls.examples(HID, OUT)
            cases.append({"id": f"{name}-{i}" if i else name, "name": name, "p1": params,
                          "p2": second[i] if i < len(second) else second[0]})
    cases.append({"id": "toy-hazards", "name": "toy-hazards", "p1": {}, "p2": {}})
    return cases


class Net(nn.Module):
    def __init__(self, case: dict):
        super().__init__()
        if case["name"] == "toy-hazards":
            self.l1, self.l2 = ToyHazards(IN, HID), ToyHazards(HID, OUT - 1)
        else:
            self.l1 = deftly.make(case["name"], IN, HID, **case["p1"])
            self.l2 = deftly.make(case["name"], HID, OUT, **case["p2"])

    def forward(self, x):
        h = self.l1(x)
        h = torch.tanh(h.real if h.is_complex() else h)
        return self.l2(h)


def loss_fn(y, target):
    target = target[..., : y.shape[-1]]
    if y.is_complex():
        return (y.real - target).pow(2).mean() + y.imag.pow(2).mean()
    return (y - target).pow(2).mean()


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


def build(case, seed=0):
    torch.manual_seed(seed)
    return Net(case)


def make_optimizer(model):
    # AdamW with eps=1e-3, not 1e-8: Adam divides by sqrt(v) + eps, so an entry whose gradient is a
    # cancellation down to ~1e-8 (measured: the complex butterfly with real_output) turns float32 rounding
    # into an lr-sized step. Summing two half-batch gradients instead of one global batch, in ONE process,
    # already moved such a parameter by 2.7e-5 (eps=1e-8) / 1.2e-5 (eps=1e-6) / 6e-8 (eps=1e-3) after 4
    # steps: with the default eps the 1e-5 comparison would test Adam's conditioning, not the
    # distributed math. The full Adam state (step, exp_avg, exp_avg_sq) is still checkpointed and resumed.
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, eps=1e-3)


def train_steps(model, opt, steps, rows=slice(None)):
    for s in steps:
        x, t = batch(s)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[rows]), t[rows]).backward()
        opt.step()


# --------------------------------------------------------------------------- the worker (2 processes)
def _worker(workdir: Path) -> None:
    info = ddist.setup(timeout_s=60)  # a rank failing alone turns into an error, not a hang
    assert info.world_size == 2 and info.backend == "gloo", info
    torch.set_num_threads(1)
    cases = json.loads((workdir / "cases.json").read_text())
    results: dict = {}
    rows = ddist.local_slice(GLOBAL_BATCH)
    for strategy in STRATEGIES:
        for case in cases:
            key = f"{case['id']}|{strategy}"
            cdir = workdir / case["id"]
            rec: dict = {}
            try:
                # 3 steps from the single-process init, on this rank's half of each global batch
                model = build(case, seed=99)  # overwritten by the init checkpoint below
                ddist.load_full_state_dict(model, load(cdir / "init.ckpt")["model"])
                x0, _ = batch(0)
                model = ddist.wrap_model(model, strategy, example_input=x0[rows])
                if strategy == "ddp":
                    rec["find_unused_parameters"] = bool(model.find_unused_parameters)
                opt = make_optimizer(model)
                train_steps(model, opt, range(STEPS), rows)
                sd = ddist.full_state_dict(model)
                osd = ddist.full_optimizer_state_dict(model, opt)
                if info.is_main:
                    save(cdir / f"dist_{strategy}_3.ckpt", {"model": sd, "optim": osd})
                # to_dense of a sharded layer, gathered, equals the single-process layer's
                with ddist.gathered(model) as inner:
                    dense = inner.l1.to_dense().detach().clone()
                    attr = getattr(dict(inner.named_parameters()).get("l1.weight"), "lr_scale", None) \
                        if case["name"] == "toy-hazards" else None
                if case["name"] == "toy-hazards" and strategy == "fsdp2":
                    stored = [n for n, _ in model.named_parameters()
                              if n.startswith("l1.parametrizations.weight")]
                    attr = [getattr(p, "lr_scale", None) for n, p in model.named_parameters() if n in stored]
                rec["lr_scale_attr"] = attr
                if info.is_main:
                    single = build(case, seed=5)
                    single.load_state_dict(sd)
                    rec["to_dense_diff"] = float((single.l1.to_dense() - dense).abs().max())
                # resume: the single-process checkpoint after 3 steps -> a 4th step here
                model = ddist.wrap_model(build(case, seed=7), strategy, example_input=x0[rows])
                opt = make_optimizer(model)
                ref = load(cdir / "ref3.ckpt") if info.is_main else None
                ddist.load_full_state_dict(model, ref["model"] if ref else None)
                ddist.load_full_optimizer_state_dict(model, opt, ref["optim"] if ref else None)
                train_steps(model, opt, [STEPS], rows)
                sd = ddist.full_state_dict(model)
                if info.is_main:
                    save(cdir / f"dist_{strategy}_resumed4.ckpt", {"model": sd})
                rec["ok"] = True
            except Exception:  # recorded; both ranks run the same code, so both fail alike
                rec["error"] = traceback.format_exc()[-3000:]
                print(f"rank {info.rank} {key} FAILED:\n{rec['error']}", file=sys.stderr, flush=True)
            results[key] = rec
        # a bad state dict: every rank raises the same ValueError and the sharded model is unchanged
        case = cases[0]
        model = ddist.wrap_model(build(case), strategy, example_input=batch(0)[0][rows])
        before = ddist.full_state_dict(model)
        bad = None
        if info.is_main:
            bad = dict(before)
            k = next(iter(k for k in bad if k.endswith("bias")))
            bad[k] = torch.zeros(bad[k].shape[0] + 1)
        try:
            ddist.load_full_state_dict(model, bad, source="bad.ckpt")
            msg = None
        except ValueError as err:
            msg = str(err)
        after = ddist.full_state_dict(model)
        results[f"bad-load|{strategy}"] = {
            "error": msg, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
    (workdir / f"results_rank{info.rank}.json").write_text(json.dumps(results))
    ddist.teardown()


# --------------------------------------------------------------------------- the launch (this process)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(workdir: Path, nproc: int = 2, timeout: float = WORKER_TIMEOUT_S) -> list[str]:
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        log = open(workdir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(workdir)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            codes.append("timeout")
        log.close()
    logs = [(workdir / f"rank{r}.log").read_text()[-4000:] for r in range(nproc)]
    if any(c != 0 for c in codes):
        raise AssertionError(f"workers exited with {codes}:\n" + "\n---\n".join(logs))
    return logs


CASES = _cases()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Single-process references, then one 2-process launch for every case and both strategies."""
    workdir = tmp_path_factory.mktemp("dist")
    refs = {}
    for case in CASES:
        cdir = workdir / case["id"]
        cdir.mkdir()
        model = build(case)
        save(cdir / "init.ckpt", {"model": ddist.full_state_dict(model)})
        opt = make_optimizer(model)
        train_steps(model, opt, range(STEPS))
        save(cdir / "ref3.ckpt", {"model": ddist.full_state_dict(model),
                                   "optim": ddist.full_optimizer_state_dict(model, opt)})
        ref3 = {k: v.clone() for k, v in model.state_dict().items()}
        train_steps(model, opt, [STEPS])
        refs[case["id"]] = (ref3, {k: v.clone() for k, v in model.state_dict().items()})
    (workdir / "cases.json").write_text(json.dumps(CASES))
    t0 = time.perf_counter()
    launch_workers(workdir)
    elapsed = time.perf_counter() - t0
    results = json.loads((workdir / "results_rank0.json").read_text())
    return {"dir": workdir, "refs": refs, "results": results, "launch_s": elapsed}


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return {k: float((a[k].to(b[k].dtype) - b[k]).abs().max()) if a[k].numel() else 0.0 for k in b}


def _check_record(run, case, strategy):
    rec = run["results"][f"{case['id']}|{strategy}"]
    assert "error" not in rec, f"{case['id']} under {strategy} failed in the workers:\n{rec['error']}"
    return rec


PARAMS = [pytest.param(c, s, id=f"{c['id']}-{s}") for c in CASES for s in STRATEGIES]


@pytest.mark.parametrize(("case", "strategy"), PARAMS)
def test_distributed_steps_equal_single_process(run, case, strategy):
    """3 AdamW steps on 2 ranks x half batch == 3 steps on the global batch in one process (1e-5); the
    distributed checkpoint loads here and its optimizer state resumes to the single-process 4th step."""
    rec = _check_record(run, case, strategy)
    path = run["dir"] / case["id"] / f"dist_{strategy}_3.ckpt"
    state = load(path)
    ref3, ref4 = run["refs"][case["id"]]
    model = build(case, seed=123)  # a different init, overwritten by the checkpoint
    ddist.load_full_state_dict(model, state["model"], source=str(path))
    diffs = _max_diff(model.state_dict(), ref3)
    print(f"[dist] {case['id']:14s} {strategy:5s} max|param - single process| after {STEPS} steps: "
          f"{max(diffs.values()):.1e}")
    assert max(diffs.values()) <= TOL, diffs
    assert any(not torch.equal(ref3[k], v) for k, v in load(run["dir"] / case["id"] / "init.ckpt")["model"]
               .items()), "training did not move the parameters: the comparison would be vacuous"
    opt = make_optimizer(model)
    ddist.load_full_optimizer_state_dict(model, opt, state["optim"], source=str(path))
    train_steps(model, opt, [STEPS])
    diffs = _max_diff(model.state_dict(), ref4)
    assert max(diffs.values()) <= TOL, diffs
    assert rec["to_dense_diff"] <= TOL


@pytest.mark.parametrize(("case", "strategy"), PARAMS)
def test_single_process_checkpoint_resumes_distributed(run, case, strategy):
    """The single-process checkpoint (model + optimizer after 3 steps) loaded into a DDP/FSDP2 model on
    2 ranks takes the same 4th step as the single process."""
    _check_record(run, case, strategy)
    state = load(run["dir"] / case["id"] / f"dist_{strategy}_resumed4.ckpt")
    ref3, ref4 = run["refs"][case["id"]]
    diffs = _max_diff(state["model"], ref4)
    assert max(diffs.values()) <= TOL, diffs
    moved = _max_diff(state["model"], ref3)
    assert max(moved.values()) > 10 * TOL, "the 4th step did not move anything: the check would be vacuous"


def test_toy_hazards_handled(run):
    """The test-only layer: DDP found its unused parameter; FSDP2 kept the Parameter attribute on the
    stored (real, imag) parameters and on DDP's parameter."""
    ddp, fsdp = run["results"]["toy-hazards|ddp"], run["results"]["toy-hazards|fsdp2"]
    assert "error" not in ddp and "error" not in fsdp, (ddp.get("error"), fsdp.get("error"))
    assert ddp["find_unused_parameters"] is True
    assert ddp["lr_scale_attr"] == 0.5
    assert fsdp["lr_scale_attr"] == [0.5, 0.5]


def test_structures_have_no_unused_parameters(run):
    """No registered structure leaves a parameter without gradient (so DDP needs no
    find_unused_parameters, which costs a graph traversal per step)."""
    found = {k: r.get("find_unused_parameters") for k, r in run["results"].items()
             if k.endswith("|ddp") and not k.startswith(("toy-hazards", "bad-load"))}
    assert found and not any(found.values()), found


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_state_dict_raises_on_all_ranks_and_changes_nothing(run, strategy):
    rec = run["results"][f"bad-load|{strategy}"]
    assert rec["error"] and "bad.ckpt" in rec["error"] and "expected shape" in rec["error"], rec
    assert rec["unchanged"], rec


def test_launch_time(run):
    """Budget: one launch for every case and both strategies (start-up included)."""
    assert run["launch_s"] < WORKER_TIMEOUT_S
    print(f"2-process launch: {run['launch_s']:.1f} s for {len(CASES)} cases x {len(STRATEGIES)} strategies")


# --------------------------------------------------------------------------- single-process API checks
def test_setup_without_torchrun_is_single_process(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    info = ddist.setup()
    assert (info.rank, info.world_size, info.backend, info.distributed) == (0, 1, None, False)
    model = nn.Linear(3, 2)
    assert ddist.wrap_model(model, "none") is model
    with pytest.raises(RuntimeError, match="needs a process group"):
        ddist.wrap_model(model, "ddp")


def test_setup_partial_env_names_missing_vars(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        ddist.setup()


def test_wrap_model_bad_strategy():
    with pytest.raises(ValueError, match="strategy='zero3'"):
        ddist.wrap_model(nn.Linear(2, 2), "zero3")


def test_local_slice():
    info = ddist.DistInfo(rank=1, world_size=2)
    assert ddist.local_slice(8, info) == slice(4, 8)
    with pytest.raises(ValueError, match="global_batch=7.*world_size=2"):
        ddist.local_slice(7, info)


def test_load_full_state_dict_single_process_checks_before_loading():
    model = deftly.make("lowrank", 6, 4, rank=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    bad["U"] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"my\.ckpt.*'U'.*expected shape \[4, 2\], found \[5, 2\]"):
        ddist.load_full_state_dict(model, bad, source="my.ckpt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bad = {k: v for k, v in before.items() if k != "V"}
    bad["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing key 'V'.*unexpected key 'extra'"):
        ddist.load_full_state_dict(model, bad)


def test_unused_parameters_probe():
    layer = ToyHazards(4, 3)
    assert ddist.unused_parameters(layer, torch.randn(2, 4)) == ["unused"]
    assert layer.weight.grad is None


def test_example_script_single_process(tmp_path, capsys):
    """examples/ddp_train.py (the torchrun example of docs/distributed.md) runs its one-process path and
    writes a checkpoint that loads into a fresh model. The 2-process runs are recorded in the docs."""
    import importlib.util

    try:
        from deftly.data import fashion_mnist

        fashion_mnist.load("test", limit=1)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"Fashion-MNIST not available: {err}")
    spec = importlib.util.spec_from_file_location(
        "ddp_train", Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "ex.ckpt"
    assert mod.main(["--strategy", "none", "--steps", "3", "--train-limit", "512", "--hidden", "32",
                     "--checkpoint", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    acc = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "test accuracy" in line]
    assert len(acc) == 2 and acc[0] == acc[1] and 0.0 < acc[0] <= 1.0, out
    state = load(path)
    fresh = mod.build("monarch", 32)
    ddist.load_full_state_dict(fresh, state["model"], source=str(path))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
