"""The meta device end to end, for every registered structure: build on meta (nothing allocated), then
``to_empty`` and either ``load_state_dict`` or ``reset_parameters`` gives the layer a CPU build gives.

Index buffers (partition gathers, butterfly permutations) are derived from sizes and are not state, so
these tests also poison them with valid-but-wrong indices (zeros: a silent wrong answer, not a crash)
and check that ``reset_parameters`` and ``load_state_dict`` re-derive them. The FSDP2 deferred init
(2 gloo processes: meta -> ``fully_shard`` -> ``to_empty`` -> ``reset_parameters`` or a full state dict)
is compared with the eager single-process model: same init, same 3 AdamW steps. The workers are this
file run as a script, launched like ``tests/test_distributed.py``'s (whose model, batches and optimizer
are reused).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import deftly
from deftly.surgery.modules import linear_modules

# the 2-process launch and the model/batches/optimizer of tests/test_distributed.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distributed as td

SIZES = [(30, 50), (50, 30), (16, 16)]


def _cases() -> list[tuple[str, tuple[int, int], dict]]:
    out = []
    for name in deftly.structures():
        for io in SIZES:
            for params in deftly.get(name).examples(*io):
                out.append((name, io, params))
    return out


CASES = _cases()


def _id(case) -> str:
    name, (i, o), params = case
    return f"{name}-{i}x{o}" + "".join(f"-{k}{v}" for k, v in params.items())


def _cpu(name, io, params, seed):
    torch.manual_seed(seed)
    return deftly.make(name, *io, **params)


def _meta(name, io, params):
    layer = deftly.make(name, *io, device="meta", **params)
    assert all(t.is_meta for t in (*layer.parameters(), *layer.buffers())), "meta build allocated memory"
    return layer


def _poison(layer) -> int:
    """Overwrite every index buffer with zeros (in range, so a stale buffer gives wrong numbers, not an
    error); return how many there were."""
    n = 0
    for b in layer.buffers():
        if not (b.is_floating_point() or b.is_complex()):
            b.zero_()
            n += 1
    return n


def _assert_same_layer(layer, ref, in_f):
    sd, rsd = layer.state_dict(), ref.state_dict()
    assert sd.keys() == rsd.keys()
    for k, v in rsd.items():
        assert torch.equal(sd[k], v), k
    bufs, rbufs = dict(layer.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == rbufs.keys()
    for k, v in rbufs.items():
        assert bufs[k].device == v.device and torch.equal(bufs[k], v), k
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), deftly.kernels.use_backend("native"):
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(layer.reference_forward(x), ref.reference_forward(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)  # the dispatched backend
        torch.testing.assert_close(layer.to_dense(), ref.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_meta_to_empty_load_state_dict_equals_reference(case):
    name, io, params = case
    ref = _cpu(name, io, params, seed=3)
    layer = _meta(name, io, params).to_empty(device="cpu")
    layer.load_state_dict(ref.state_dict())
    _assert_same_layer(layer, ref, io[0])
    # stale index buffers (whatever left them so) are re-derived by load_state_dict
    if _poison(layer):
        layer.load_state_dict(ref.state_dict())
        _assert_same_layer(layer, ref, io[0])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_meta_to_empty_reset_parameters_equals_cpu_build(case):
    """Seeded: meta -> to_empty -> reset_parameters draws exactly what the CPU constructor draws (so the
    init statistics are the same too, by construction); the index buffers are rebuilt."""
    name, io, params = case
    ref = _cpu(name, io, params, seed=5)
    layer = _meta(name, io, params).to_empty(device="cpu")
    _poison(layer)
    torch.manual_seed(5)
    layer.reset_parameters()
    _assert_same_layer(layer, ref, io[0])


@pytest.mark.parametrize("name", deftly.structures())
def test_meta_reset_parameters_statistics(name):
    """Unseeded, a layer initialised from meta has the output variance of a CPU-built one (and of
    nn.Linear, the structures' target): 64 independent layers each, 256 inputs."""
    in_f, out_f = 48, 40
    params = deftly.get(name).examples(in_f, out_f)[0]
    x = torch.randn(256, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def output_var(make):
        ys = []
        for s in range(64):
            torch.manual_seed(100 + s)
            layer = make().double()
            with torch.no_grad():
                y = layer(x) - (layer.bias if layer.bias is not None else 0)
                if layer.has_fixed_residual:
                    y = y - layer.fixed_residual(x)
            ys.append(y.real if y.is_complex() else y)
        return torch.stack(ys).var().item()

    def from_meta():
        layer = deftly.make(name, in_f, out_f, device="meta", **params).to_empty(device="cpu")
        layer.reset_parameters()
        return layer

    v_meta = output_var(from_meta)
    v_cpu = output_var(lambda: deftly.make(name, in_f, out_f, **params))
    assert v_meta == pytest.approx(v_cpu, rel=0.15), (v_meta, v_cpu)


@pytest.mark.parametrize("name", ["blockdiag", "monarch", "lrbd", "butterfly"])
def test_load_state_dict_assign_into_meta_layer(name):
    """``load_state_dict(assign=True)`` into a meta-built layer (no ``to_empty``) moves the parameters;
    the index buffers follow them instead of staying on meta."""
    io = (30, 50)
    params = deftly.get(name).examples(*io)[0]
    ref = _cpu(name, io, params, seed=7)
    layer = _meta(name, io, params)
    layer.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    _assert_same_layer(layer, ref, io[0])


def test_device_context_manager_and_to():
    """``with torch.device("meta")`` (how Hugging Face / FSDP build big models), then ``to_empty``;
    and ``.to(dtype)`` / ``.double()`` round trips keep the (integer) index buffers right."""
    with torch.device("meta"):
        net = nn.Sequential(deftly.make("blockdiag", 30, 50, nblocks=4), nn.Tanh(),
                            deftly.make("butterfly", 50, 30, perm="bitrev"))
    assert all(t.is_meta for t in (*net.parameters(), *net.buffers()))
    torch.manual_seed(0)
    ref = nn.Sequential(deftly.make("blockdiag", 30, 50, nblocks=4), nn.Tanh(),
                        deftly.make("butterfly", 50, 30, perm="bitrev"))
    net.to_empty(device="cpu").load_state_dict(ref.state_dict())
    net = net.double().float()
    x = torch.randn(3, 30)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["blockdiag", "monarch", "butterfly"])
def test_compile_fullgraph_after_meta_init(name):
    io = (30, 50)
    params = deftly.get(name).examples(*io)[0]
    ref = _cpu(name, io, params, seed=2)
    layer = _meta(name, io, params).to_empty(device="cpu")
    layer.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    fn = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(4, 30)
    with torch.no_grad():
        torch.testing.assert_close(fn(x), ref(x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- structurize on meta
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(30, 50)
        self.down = nn.Linear(50, 30)
        self.head = nn.Linear(30, 7)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("structure", ["monarch", "blockdiag", "lrbd", "butterfly", "lowrank"])
def test_structurize_random_on_meta(structure):
    """``structurize(init="random")`` on a meta model allocates nothing; the structured model then
    materialises (``to_empty`` + ``load_state_dict``) to the CPU-structurized one, exactly."""
    cfg = deftly.StructureConfig(structure=structure, budget=0.6, init="random", seed=4)
    torch.manual_seed(0)
    ref = _MLP()
    ref_report = deftly.structurize(ref, cfg)
    with torch.device("meta"):
        model = _MLP()
    report = deftly.structurize(model, cfg)
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert [(r.name, r.hparams, r.params_after) for r in report.layers] == \
        [(r.name, r.hparams, r.params_after) for r in ref_report.layers]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    model.to_empty(device="cpu").load_state_dict(ref.state_dict())
    x = torch.randn(6, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)
    # and reset_parameters of every structured layer, seeded as structurize seeds them, rebuilds them
    model.load_state_dict({k: torch.zeros_like(v) for k, v in ref.state_dict().items()})
    for i, name in enumerate(["up", "down"]):
        torch.manual_seed(cfg.seed + i)
        model.get_submodule(name).reset_parameters()
    for name in ["up", "down"]:
        a, b = model.get_submodule(name), ref.get_submodule(name)
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_structurize_project_on_meta_is_refused():
    with torch.device("meta"):
        model = _MLP()
    before = [n for n, _ in linear_modules(model)]
    with pytest.raises(ValueError, match=r"meta device.*to_empty.*init='random'"):
        deftly.structurize(model, deftly.StructureConfig(structure="monarch", budget=0.5))
    assert [n for n, _ in linear_modules(model)] == before  # unchanged


# --------------------------------------------------------------------------- FSDP2 deferred init


def _one_dtype_per_layer(case: dict) -> bool:
    """plain fully_shard needs one parameter dtype per layer (a complex butterfly with a real output and
    bias has two: ``deftly.distributed.wrap_model`` converts those, for models built on a device)"""
    with torch.device("meta"):
        net = td.Net(case)
    return all(len({p.dtype for p in m.parameters()}) == 1 for m in (net.l1, net.l2))


FSDP_CASES = [c for c in td.CASES if c["name"] != "toy-hazards" and _one_dtype_per_layer(c)]
MODES = ("reset", "load")


def _fsdp_deferred(case: dict, mode: str, init_state: dict | None, seed: int) -> nn.Module:
    """Meta -> fully_shard (each structured layer, then the root) -> to_empty -> reset_parameters or
    load the eager init."""
    from torch.distributed.fsdp import fully_shard

    from deftly import distributed as ddist
    from deftly.distributed.wrap import _placement_fn

    with torch.device("meta"):
        model = td.Net(case)
    kw = {"shard_placement_fn": _placement_fn(ddist.info().world_size)}
    for layer in (model.l1, model.l2):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model.to_empty(device="cpu")
    if mode == "reset":  # what td.build(case, seed) draws, in the same order
        torch.manual_seed(seed)
        model.l1.reset_parameters()
        model.l2.reset_parameters()
    else:
        ddist.load_full_state_dict(model, init_state)
    return model


def _worker(workdir: Path) -> None:
    from deftly import distributed as ddist

    info = ddist.setup(timeout_s=getattr(td, "PG_TIMEOUT_S", 180))
    torch.set_num_threads(1)
    rows = ddist.local_slice(td.GLOBAL_BATCH)
    results = {}
    for case in FSDP_CASES:
        init = torch.load(workdir / case["id"] / "init.pt") if info.is_main else None
        for mode in MODES:
            rec: dict = {}
            try:
                model = _fsdp_deferred(case, mode, init, seed=11)
                sd0 = ddist.full_state_dict(model)
                bufs = {n: b.clone() for n, b in model.named_buffers()}  # buffers are not sharded
                opt = td.make_optimizer(model)
                td.train_steps(model, opt, range(td.STEPS), rows)
                sd3 = ddist.full_state_dict(model)
                if info.is_main:
                    torch.save({"init": sd0, "steps": sd3, "buffers": bufs},
                               workdir / case["id"] / f"{mode}.pt")
                rec["ok"] = True
            except Exception:  # noqa: BLE001 - recorded; both ranks run the same code, so both fail alike
                rec["error"] = traceback.format_exc()[-3000:]
                print(f"rank {info.rank} {case['id']}|{mode} FAILED:\n{rec['error']}", file=sys.stderr)
            results[f"{case['id']}|{mode}"] = rec
    (workdir / f"results_rank{info.rank}.json").write_text(json.dumps(results))
    ddist.teardown()


def _launch(workdir: Path) -> None:
    """test_distributed's launcher (store, retry, logs) running this file's worker: it starts the script
    at its module's ``__file__``, so that is pointed here for the launch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td, "__file__", __file__)
        td.launch_workers(workdir)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("meta_fsdp")
    refs = {}
    for case in FSDP_CASES:
        (workdir / case["id"]).mkdir()
        model = td.build(case, seed=11)  # eager init: what the deferred init must reproduce
        init = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(init, workdir / case["id"] / "init.pt")
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        opt = td.make_optimizer(model)
        td.train_steps(model, opt, range(td.STEPS))
        refs[case["id"]] = (init, bufs, {k: v.clone() for k, v in model.state_dict().items()})
    t0 = time.perf_counter()
    _launch(workdir)
    print(f"FSDP2 deferred-init launch: {time.perf_counter() - t0:.1f} s for {len(FSDP_CASES)} cases x "
          f"{len(MODES)} modes")
    return {"dir": workdir, "refs": refs,
            "results": json.loads((workdir / "results_rank0.json").read_text())}


@pytest.mark.parametrize(("case", "mode"), [pytest.param(c, m, id=f"{c['id']}-{m}")
                                            for c in FSDP_CASES for m in MODES])
def test_fsdp2_deferred_init_trains_like_eager(fsdp_run, case, mode):
    """Meta -> fully_shard -> to_empty -> reset_parameters (seeded) / load: the full state equals the
    eager init exactly (sharded random init draws the unsharded values: no two ranks draw the same
    shard), the index buffers are the eager ones, and 3 AdamW steps on 2 ranks match the eager steps."""
    rec = fsdp_run["results"][f"{case['id']}|{mode}"]
    assert "error" not in rec, f"{case['id']} {mode} failed in the workers:\n{rec['error']}"
    got = torch.load(fsdp_run["dir"] / case["id"] / f"{mode}.pt")
    init, bufs, ref3 = fsdp_run["refs"][case["id"]]
    assert got["init"].keys() == init.keys()
    for k in init:
        assert torch.equal(got["init"][k], init[k]), k
    assert got["buffers"].keys() == bufs.keys()
    for k in bufs:
        assert torch.equal(got["buffers"][k], bufs[k]), k
    diffs = {k: float((got["steps"][k] - ref3[k]).abs().max()) for k in ref3}
    assert max(diffs.values()) <= td.TOL, diffs
    assert any(not torch.equal(ref3[k], init[k]) for k in init), "training did not move the parameters"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
