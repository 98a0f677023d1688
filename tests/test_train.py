"""deftly.train: μP per-factor learning rates, the budget search, and the training loop."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import deftly
from deftly.data import MissingDataError
from deftly.train.loop import Progress, TrainConfig, epoch_batches, lr_at, train
from deftly.train.mup import layer_multipliers, lr_multipliers, param_groups, set_lr


@pytest.fixture(autouse=True)
def _one_thread():
    from deftly.train import mup

    mup._CACHE.clear()  # multipliers are measured on the layer as built in each test
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------ μP multipliers
def test_dense_and_nn_linear_have_multiplier_one():
    assert layer_multipliers(deftly.make("dense", 64, 32)) == {"weight": 1.0}
    assert layer_multipliers(nn.Linear(64, 32)) == {"weight": 1.0}


@pytest.mark.parametrize("nblocks", [4, 16])
def test_blockdiag_multiplier_is_the_number_of_blocks(nblocks):
    torch.manual_seed(0)
    # one factor whose fan-in is in/nblocks: the paper's rule d_in / (d_in_factor * 1) = nblocks
    m = layer_multipliers(deftly.make("blockdiag", 256, 256, nblocks=nblocks))["weight"]
    assert m == pytest.approx(nblocks, rel=0.1)


def test_lowrank_multipliers_follow_the_fan_in_rule():
    torch.manual_seed(0)  # the probe measures the layer as initialised
    m = layer_multipliers(deftly.make("lowrank", 256, 256, rank=32))
    # V: fan-in 256 -> 256 / (256 * 2) = 0.5; U: fan-in 32 -> 256 / (32 * 2) = 4
    assert m["V"] == pytest.approx(0.5, rel=0.35)
    assert m["U"] == pytest.approx(4.0, rel=0.4)  # measured 4.8-5.5 over init seeds


def test_monarch_multipliers_follow_the_fan_in_rule():
    if "monarch" not in deftly.structures():
        pytest.skip("monarch not registered")
    torch.manual_seed(0)
    m = layer_multipliers(deftly.make("monarch", 256, 256, nblocks=16, out_blocks=16, rank=1))
    assert m["R"] == pytest.approx(256 / (16 * 2), rel=0.35)  # R blocks: fan-in 16
    assert m["L"] == pytest.approx(256 / (16 * 2), rel=0.35)  # L blocks: fan-in nblocks * rank = 16


def test_param_groups_cover_every_parameter_once_with_scaled_lrs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.GELU(), deftly.make("blockdiag", 32, 32, nblocks=4), nn.LayerNorm(32),
                          nn.Linear(32, 5))
    groups = param_groups(model, 1e-3, weight_decay=0.1, exclude=(model[0], model[4]), max_multiplier=None)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["2.weight"]["lr"] == pytest.approx(1e-3 * 4, rel=0.1)
    assert by_name["0.weight"]["lr"] == 1e-3 and by_name["4.weight"]["lr"] == 1e-3
    assert by_name["2.bias"]["weight_decay"] == 0.0 and by_name["3.weight"]["weight_decay"] == 0.0
    # decoupled decay per step lr * wd stays that of dense
    g = by_name["2.weight"]
    assert g["lr"] * g["weight_decay"] == pytest.approx(1e-3 * 0.1)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    set_lr(opt, 2e-3)
    assert {round(g["lr"] / g["lr_mult"], 9) for g in opt.param_groups} == {2e-3}
    with pytest.raises(ValueError, match="lr=0"):
        param_groups(model, 0)


def test_param_groups_max_multiplier_caps_every_factor():
    torch.manual_seed(0)
    model = nn.Sequential(deftly.make("lowrank", 64, 64, rank=8), nn.GELU(),
                          deftly.make("blockdiag", 64, 64, nblocks=4), nn.LayerNorm(64), nn.Linear(64, 5))
    free = {n: g["lr_mult"] for g in param_groups(model, 1e-3, max_multiplier=None) for n in g["names"]}
    assert free["0.U"] > 2 and free["2.weight"] > 2 and free["0.V"] < 1  # what the cap acts on
    default = {n: g["lr_mult"] for g in param_groups(model, 1e-3) for n in g["names"]}
    assert default == {n: (m if n.startswith("3.") or n.endswith("bias") else min(m, 2.0))
                       for n, m in free.items()}  # the default cap is 2 (DEFAULT_MAX_MULTIPLIER)
    for cap in (1.0, 0.5):
        groups = param_groups(model, 1e-3, max_multiplier=cap)
        capped = {n: g for g in groups for n in g["names"]}
        assert all(g["lr_mult"] <= cap + 1e-12 and g["lr"] <= 1e-3 * cap + 1e-15 for g in groups
                   if any(n.endswith(("U", "V", "weight")) and not n.startswith("3.") for n in g["names"]))
        for name, m in free.items():  # multipliers under the cap are unchanged; non-linear ones stay 1
            if name.startswith("3.") or name.endswith("bias"):
                assert capped[name]["lr_mult"] == 1.0
            else:
                assert capped[name]["lr_mult"] == pytest.approx(min(m, cap))
    assert lr_multipliers(model, max_multiplier=1.0)["0.U"] == 1.0
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_multiplier"):
            param_groups(model, 1e-3, max_multiplier=bad)


def test_lr_multipliers_with_width_rule():
    model = nn.Sequential(deftly.make("dense", 64, 64), deftly.make("dense", 64, 64))
    m = lr_multipliers(model, base_width=32)
    assert m["0.weight"] == pytest.approx(0.5) and m["0.bias"] == 1.0


def test_mup_structured_mlp_is_not_worse_than_one_global_lr():
    """On a real Fashion-MNIST slice, per-factor learning rates train a block-diagonal MLP at least as
    well as the dense learning rate applied to every parameter (here clearly better)."""
    from deftly.data import fashion_mnist

    try:
        x, y = fashion_mnist.tensors("train", limit=3000)
        xt, yt = fashion_mnist.tensors("test", limit=1000)
    except MissingDataError as err:
        pytest.skip(str(err))
    idx = epoch_batches(len(x), 64, 0)
    results = {}
    for mup in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 128), nn.GELU(), deftly.make("blockdiag", 128, 128, nblocks=16),
                              nn.GELU(), deftly.make("blockdiag", 128, 128, nblocks=16), nn.GELU(), nn.Linear(128, 10))
        res = train(model, lambda s: (x[idx(s)], y[idx(s)]),
                    lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                    TrainConfig(steps=150, lr=1e-3, warmup=10, mup=mup, progress=False),
                    evaluate=lambda m: {"acc": float((m(xt).argmax(1) == yt).float().mean())},
                    exclude_from_mup=(model[0], model[6]))
        results[mup] = (sum(res.losses[-30:]) / 30, res.history[-1]["acc"])
    (mup_loss, mup_acc), (glob_loss, glob_acc) = results[True], results[False]
    assert mup_loss <= glob_loss, results
    assert mup_acc >= glob_acc - 0.005, results


# ------------------------------------------------------------------ loop pieces
def test_epoch_batches_are_permutations_and_deterministic():
    f = epoch_batches(100, 10, seed=3)
    epoch0 = torch.cat([f(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    epoch1 = torch.cat([f(s) for s in range(10, 20)])
    assert sorted(epoch1.tolist()) == list(range(100)) and not torch.equal(epoch0, epoch1)
    g = epoch_batches(100, 10, seed=3)
    assert torch.equal(g(13), f(13))
    with pytest.raises(ValueError, match="batch_size=200"):
        epoch_batches(100, 200, 0)


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    const = TrainConfig(steps=100, lr=0.5, warmup=0, min_lr_ratio=1.0)
    assert {lr_at(s, const) for s in range(100)} == {0.5}


def test_config_validation():
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="clock='cpu'"):
        TrainConfig(clock="cpu")


def test_progress_bar_prints_loss_and_eta():
    buf = io.StringIO()
    bar = Progress(10, "job", stream=buf)
    bar.update(5, 1.5, force=True)
    line = buf.getvalue()
    assert "job 5/10" in line and "loss 1.5000" in line and "ETA" in line and "it/s" in line


def _toy():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), deftly.make("lowrank", 16, 16, rank=4), nn.ReLU(),
                          nn.Linear(16, 2))
    idx = epoch_batches(256, 32, 0)
    return model, (lambda s: (x[idx(s)], y[idx(s)])), (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])), x, y


def test_train_learns_evaluates_and_checkpoints(tmp_path):
    model, gb, lf, x, y = _toy()
    cfg = TrainConfig(steps=60, lr=1e-2, eval_every=20, checkpoint_every=20, progress=False)
    res = train(model, gb, lf, cfg, evaluate=lambda m: {"acc": float((m(x).argmax(1) == y).float().mean())},
                checkpoint_path=tmp_path / "c.safetensors")
    assert res.step == 60 and len(res.losses) == 60
    assert [h["step"] for h in res.history] == [20, 40, 60]
    assert res.history[-1]["acc"] > 0.9
    assert all(h["train_time"] > 0 for h in res.history)
    from deftly.io.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "c.safetensors")
    assert state["step"] == 60 and state["config"]["lr"] == 1e-2


def test_resume_refuses_a_different_config(tmp_path):
    model, gb, lf, *_ = _toy()
    train(model, gb, lf, TrainConfig(steps=5, lr=1e-2, progress=False), checkpoint_path=tmp_path / "c.safetensors")
    model, gb, lf, *_ = _toy()
    with pytest.raises(ValueError, match="lr=0.01"):
        train(model, gb, lf, TrainConfig(steps=5, lr=3e-2, progress=False), checkpoint_path=tmp_path / "c.safetensors",
              resume=True)


def test_max_time_stops_early_and_wrap_model_hook_is_used():
    model, gb, lf, *_ = _toy()
    calls = []

    def wrap(m):
        calls.append(m)
        return m

    res = train(model, gb, lf, TrainConfig(steps=10_000, lr=1e-2, max_time=0.2, progress=False), wrap_model=wrap)
    assert 0 < res.step < 10_000 and calls == [model]


def test_nan_loss_is_reported():
    model, gb, _, *_ = _toy()
    with pytest.raises(FloatingPointError, match="lower lr"):
        train(model, gb, lambda m, b: m(b[0]).sum() * math.nan, TrainConfig(steps=3, progress=False))


def test_charlm_resume_key_ignores_cap_for_dense_and_reuses_longer_runs():
    from deftly.train.charlm import CharLMConfig, _resume_key, _reusable

    capped, free = CharLMConfig(max_lr_mult=1.0), CharLMConfig(max_lr_mult=None, mup=False)
    assert _resume_key(capped, "dense", 10) == _resume_key(free, "dense", 10)  # dense is the same run
    assert _resume_key(capped, "lowrank", 10) != _resume_key(CharLMConfig(max_lr_mult=None), "lowrank", 10)
    assert "max_lr_mult" not in _resume_key(CharLMConfig(max_lr_mult=None), "lowrank", 10)  # older runs reusable
    saved = _resume_key(capped, "blockdiag", 1800)
    assert _reusable(saved, _resume_key(capped, "blockdiag", 1700))
    assert not _reusable(saved, _resume_key(capped, "blockdiag", 1900))
    assert not _reusable(saved, _resume_key(CharLMConfig(max_lr_mult=0.5), "blockdiag", 1800))
    with pytest.raises(ValueError, match="max_lr_mult"):
        CharLMConfig(max_lr_mult=0.0)
