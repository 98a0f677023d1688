"""DDP and FSDP2 on 2 CPU processes (gloo, 127.0.0.1) give the single-process result, for every structure.

One launch of 2 worker processes runs every registered structure under both strategies (process start-up
dominates on 2 cores). The workers are this file run as a script with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE), i.e. exactly the code
path of ``torchrun --nproc_per_node=2`` without the launcher's own start-up: like torchrun's agent, this
process hosts the rendezvous store, bound to port 0 (the OS picks a free port while binding it, so there is
no window in which another process can take it), and the workers' ``deftly.distributed.setup`` connects to
it. A launch that fails is retried once with a new store and port; the failed attempt's worker logs are
shown (a warning when the retry passes, in the error when it fails too), so the suite cannot fail for a
reason outside the code under test without saying so.

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

import contextlib
import json
import os
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
WORKER_TIMEOUT_S = 900  # a hang guard only (per launch attempt); a loaded 2-core machine can be slow
PG_TIMEOUT_S = 180  # a rank failing alone turns into an error in the other rank, not a hang


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
    info = ddist.setup(timeout_s=PG_TIMEOUT_S)  # a rank failing alone turns into an error, not a hang
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
            except Exception:  # noqa: BLE001 - recorded; both ranks run the same code, so both fail alike
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
def _agent_store(nproc: int):
    """The rendezvous store the workers connect to, as torchrun's agent hosts it: a TCPStore server bound to
    port 0 here (race-free: the port is chosen by the bind itself); ``store.port`` is the port it got."""
    import datetime

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))


def _launch_once(workdir: Path, attempt: int, nproc: int, timeout: float) -> tuple[list, list[str]]:
    """One launch of ``nproc`` workers; ``(exit codes, worker logs)``."""
    store = _agent_store(nproc)
    procs = []
    codes: list = []
    try:
        with contextlib.ExitStack() as logs_open:  # the workers' log files, closed once the workers are gone
            try:
                for rank in range(nproc):
                    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
                    env.pop("CUDA_VISIBLE_DEVICES", None)
                    log = logs_open.enter_context(open(workdir / f"attempt{attempt}_rank{rank}.log", "w"))
                    procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(workdir)],
                                                  env=env, stdout=log, stderr=subprocess.STDOUT))
                deadline = time.monotonic() + timeout
                for p in procs:
                    try:
                        codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        for q in procs:
                            q.kill()
                            q.wait()
                        codes.append(f"timeout after {timeout:.0f} s")
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
    finally:
        del store
    logs = [(workdir / f"attempt{attempt}_rank{r}.log").read_text()[-4000:] for r in range(nproc)]
    return codes, logs


def _format_logs(codes: list, logs: list[str]) -> str:
    return f"workers exited with {codes}:\n" + "\n---\n".join(f"[rank {r}]\n{text}" for r, text in enumerate(logs))


def launch_workers(workdir: Path, nproc: int = 2, timeout: float = WORKER_TIMEOUT_S,
                   attempts: int = 2) -> tuple[list[str], int]:
    """Run the workers; a failed launch is retried once (new store and port). Returns ``(worker logs,
    attempts used)``; raises with every attempt's logs when all fail."""
    failed: list[str] = []
    for attempt in range(1, attempts + 1):
        for r in range(nproc):  # a previous attempt's results must not be read as this one's
            (workdir / f"results_rank{r}.json").unlink(missing_ok=True)
        codes, logs = _launch_once(workdir, attempt, nproc, timeout)
        if all(c == 0 for c in codes) and all((workdir / f"results_rank{r}.json").exists() for r in range(nproc)):
            if failed:
                import warnings

                warnings.warn(f"distributed launch attempt 1 failed and was retried (attempt {attempt} passed); "
                              f"its worker logs:\n{failed[0]}", stacklevel=2)
            return logs, attempt
        failed.append(_format_logs(codes, logs))
    raise AssertionError(f"{attempts} launches failed.\n" + "\n=====\n".join(
        f"attempt {i + 1}: {text}" for i, text in enumerate(failed)))


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
    _, attempts = launch_workers(workdir)
    print(f"2-process launch: {time.perf_counter() - t0:.1f} s ({attempts} attempt(s)) for {len(CASES)} cases x "
          f"{len(STRATEGIES)} strategies")
    results = json.loads((workdir / "results_rank0.json").read_text())
    return {"dir": workdir, "refs": refs, "results": results}


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


def test_one_launch_ran_every_case(run):
    """The launch recorded every case under both strategies (plus the bad-load checks) and nothing else."""
    want = {f"{c['id']}|{s}" for c in CASES for s in STRATEGIES} | {f"bad-load|{s}" for s in STRATEGIES}
    assert set(run["results"]) == want


def test_launch_retries_once_and_shows_the_logs(tmp_path, monkeypatch):
    """A launch that fails is retried once with a new store (new port), the failed attempt's worker logs are
    shown; when both fail, the error holds both attempts' logs. Workers here are stand-ins for the real ones:
    the first attempt's rank 1 exits with status 3 after printing a marker."""
    ports = []
    real_store = _agent_store

    def store(nproc):
        s = real_store(nproc)
        ports.append(s.port)
        return s

    script = tmp_path / "fake_worker.py"
    script.write_text("import os, sys, pathlib\n"
                      "w = pathlib.Path(sys.argv[2]); r = os.environ['RANK']\n"
                      "if r == '1':\n"
                      "    try:  # only rank 1 touches this file: the first call creates it\n"
                      "        os.close(os.open(w / 'failed_once', os.O_CREAT | os.O_EXCL)); first = True\n"
                      "    except FileExistsError:\n"
                      "        first = False\n"
                      "    if first or (w / 'always').exists():\n"
                      "        print('MARKER rank', r, 'port', os.environ['MASTER_PORT']); sys.exit(3)\n"
                      "(w / f'results_rank{r}.json').write_text('{}')\n")
    monkeypatch.setattr(sys.modules[__name__], "__file__", str(script))
    monkeypatch.setattr(sys.modules[__name__], "_agent_store", store)
    with pytest.warns(UserWarning, match=r"(?s)attempt 1 failed.*MARKER rank 1"):
        _, attempts = launch_workers(tmp_path, timeout=120)
    assert attempts == 2 and len(set(ports)) == 2  # a new store and port for the retry
    (tmp_path / "always").write_text("x")
    with pytest.raises(AssertionError, match=r"(?s)2 launches failed.*attempt 1.*exited with \[0, 3\].*MARKER"
                                             r".*attempt 2.*MARKER"):
        launch_workers(tmp_path, timeout=120)


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
