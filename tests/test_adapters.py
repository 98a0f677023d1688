"""Structured adapters: frozen dense base + trainable structured delta, zero init, exact merge/unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deftly
from deftly import StructureConfig, adapt
from deftly.surgery.adapters import StructuredAdapter, learned_dense, zero_delta_init_


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


X = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))


def _train_step(model, adapters, lr=0.05):
    opt = torch.optim.SGD(list(adapters.parameters()), lr=lr)
    model(X).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def _case(name):
    """A small, valid hyperparameter set of ``name`` for both 16->32 and 32->24."""
    if name == "lowrank":
        return {"rank": 4}
    if name == "monarch":
        return {"nblocks": 4, "rank": 1}
    if name == "blockdiag":
        return {"nblocks": 4}
    if name == "lrbd":
        return {"rank": 2, "nblocks": 4}
    return None


@pytest.mark.parametrize("name", ["lowrank", "monarch", "blockdiag", "lrbd"])
def test_adapter_starts_at_zero_trains_and_merges_exactly(name):
    m = mlp()
    ref = m(X).detach()
    weights = [m[0].weight.detach().clone(), m[2].weight.detach().clone()]
    ad = adapt(m, StructureConfig(structure=name, hparams=_case(name), target_modules=["0", "2"]))
    assert [type(mod) for mod in ad.modules()] == [StructuredAdapter, StructuredAdapter]
    torch.testing.assert_close(m(X), ref, rtol=0, atol=0)  # zero-initialised delta (one factor zero)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".delta." in n for n in trainable)
    assert ad.report.trainable_params == sum(p.numel() for p in ad.parameters())
    _train_step(m, ad)
    adapted = m(X).detach()
    assert (adapted - ref).abs().max() > 1e-4  # the gradient reached the delta
    for w, mod in zip(weights, ad.modules()):
        assert torch.equal(mod.base.weight, w)  # the base stays frozen
    ad.merge()
    torch.testing.assert_close(m(X), adapted, rtol=1e-5, atol=1e-5)
    ad.merge()  # idempotent
    torch.testing.assert_close(m(X), adapted, rtol=1e-5, atol=1e-5)
    ad.unmerge()
    torch.testing.assert_close(m(X), adapted, rtol=1e-5, atol=1e-5)
    for w, mod in zip(weights, ad.modules()):
        torch.testing.assert_close(mod.base.weight, w, rtol=0, atol=1e-6)
    ad.merge_and_unload()
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], nn.Linear)
    torch.testing.assert_close(m(X), adapted, rtol=1e-5, atol=1e-5)


def test_lora_shape_and_budget_sizing():
    m = mlp()
    ad = adapt(m, StructureConfig(structure="lowrank", budget=0.1, target_modules=["0", "2"]))
    for mod in ad.modules():
        dense = mod.in_features * mod.out_features + mod.out_features
        assert mod.delta.num_params() <= 0.1 * dense
        assert torch.count_nonzero(mod.delta.U) == 0  # LoRA: B (here U) starts at zero, A random
        assert torch.count_nonzero(mod.delta.V) > 0
    assert "trainable parameters" in str(ad)


def test_every_registered_structure_works_as_an_adapter():
    for name in deftly.structures():
        m = mlp()
        ref = m(X).detach()
        ad = adapt(m, StructureConfig(structure=name, target_modules=["2"]))  # defaults, 32 -> 24
        torch.testing.assert_close(m(X), ref, rtol=0, atol=1e-6, msg=f"{name}: not zero at init")
        _train_step(m, ad)
        adapted = m(X).detach()
        assert (adapted - ref).abs().max() > 0, f"{name}: delta did not train"
        ad.merge()
        torch.testing.assert_close(m(X), adapted, rtol=1e-5, atol=1e-5, msg=f"{name}: merge not exact")


def test_zero_init_rules():
    lr = deftly.make("lowrank", 8, 6, bias=False, rank=2)
    assert zero_delta_init_(lr) and torch.count_nonzero(lr.U) == 0 and torch.count_nonzero(lr.V) > 0
    mo = deftly.make("monarch", 8, 8, bias=False, nblocks=2)
    assert zero_delta_init_(mo) and torch.count_nonzero(mo.L) == 0 and torch.count_nonzero(mo.R) > 0
    lb = deftly.make("lrbd", 8, 8, bias=False, rank=2, nblocks=2)
    assert zero_delta_init_(lb)
    assert torch.count_nonzero(learned_dense(lb)) == 0 and torch.count_nonzero(lb.lowrank.V) > 0


def test_gpt2_conv1d_adapter_merge():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = m(ids).logits.detach()
    ad = adapt(m, StructureConfig(structure="monarch", hparams={"nblocks": 4}, target_modules=["c_attn", "c_fc"]))
    assert all(mod.transposed for mod in ad.modules())
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted = m(ids).logits.detach()
    assert (adapted - ref).abs().max() > 1e-3
    ad.merge()
    torch.testing.assert_close(m(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    ad.unmerge()
    torch.testing.assert_close(m(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_checks():
    base = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="delta is 4->5 but the base layer is 4->6"):
        StructuredAdapter(base, deftly.make("lowrank", 4, 5, bias=False, rank=1))
    with pytest.raises(ValueError, match="must have no bias"):
        StructuredAdapter(base, deftly.make("lowrank", 4, 6, rank=1))
    m = mlp()
    with pytest.raises(ValueError, match="matches no linear layer"):
        adapt(m, StructureConfig(structure="lowrank", target_modules=["nope"]))
    assert all(isinstance(x, nn.Linear) for x in (m[0], m[2], m[4]))
    m2 = copy.deepcopy(m)
    adapt(m2, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0"]), freeze=False)
    assert m2[4].weight.requires_grad and not m2[0].base.weight.requires_grad


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_scale_must_be_finite(scale):
    m = mlp()
    with pytest.raises(ValueError, match=r"adapt: scale=.* is not finite.*Pass a finite number"):
        adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0"]), scale=scale)
    assert isinstance(m[0], nn.Linear) and m[0].weight.requires_grad  # untouched
    for bad in ("1.0", True, None, 1j):
        with pytest.raises(TypeError, match=r"adapt: scale=.* must be a real number"):
            adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0"]), scale=bad)
    with pytest.raises(ValueError, match="StructuredAdapter: scale=nan is not finite"):
        StructuredAdapter(nn.Linear(4, 6), deftly.make("lowrank", 4, 6, bias=False, rank=1), float("nan"))
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0"]), scale=0.5)
    assert ad.modules()[0].scale == 0.5


def test_second_adapt_on_adapted_layers_says_already_adapted():
    m = mlp()
    first = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0", "2"]))
    snapshot = [type(x) for x in m.modules()]
    for target in (["0"], ["2", "4"], r"[024]", "all-linear"):
        with pytest.raises(ValueError, match=r"adapt: \d targeted layer\(s\) are already adapted: (0|2|0, 2)\. "
                                             r".*merge_and_unload\(\)"):
            adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=target))
        assert [type(x) for x in m.modules()] == snapshot
    # targeting the other layers is fine
    adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["4"]))
    assert isinstance(m[4], StructuredAdapter)
    # after merging the first ones, they can be adapted again
    first.merge_and_unload()
    again = adapt(m, StructureConfig(structure="monarch", hparams={"nblocks": 4}, target_modules=["0", "2"]))
    assert [type(a.delta).__name__ for a in again.modules()] == ["Monarch", "Monarch"]


@pytest.mark.parametrize("how", ["handle", "function"])
def test_merge_and_unload_restores_requires_grad(how):
    # a model frozen before adapting stays frozen after merging
    m = mlp().requires_grad_(False)
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0", "2"]))
    _train_step(m, ad)
    ad.merge_and_unload() if how == "handle" else deftly.surgery.merge_and_unload(m)
    assert not any(p.requires_grad for p in m.parameters())
    # a partly frozen model gets every parameter's own flag back, merged layers and the rest alike
    # (was: merged layers trainable in a model adapt had otherwise frozen)
    m = mlp()
    m[2].bias.requires_grad_(False)
    want = {n: p.requires_grad for n, p in m.named_parameters()}
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0", "2"]))
    assert not any(p.requires_grad for n, p in m.named_parameters() if ".delta." not in n)
    ad.merge_and_unload() if how == "handle" else deftly.surgery.merge_and_unload(m)
    assert type(m[0]) is nn.Linear and type(m[2]) is nn.Linear
    assert {n: p.requires_grad for n, p in m.named_parameters()} == want
    assert not m[2].bias.requires_grad and m[4].weight.requires_grad
    # two adapt calls: the flags from before the first come back once the last adapter is unloaded
    m = mlp()
    want = {n: p.requires_grad for n, p in m.named_parameters()}
    ad0 = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["0"]))
    ad2 = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["2"]))
    if how == "handle":
        ad0.merge_and_unload()
        assert not m[4].weight.requires_grad  # an adapter is still in the model: still frozen
        ad2.merge_and_unload()
    else:
        deftly.surgery.merge_and_unload(m)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == want


def test_gpt2_merge_and_unload_keeps_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    ad = adapt(m, StructureConfig(structure="lowrank", hparams={"rank": 2}, target_modules=["c_fc"]))
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted = m(ids).logits.detach()
    ad.merge_and_unload()
    fc = m.transformer.h[0].mlp.c_fc
    assert type(fc) is transformers.pytorch_utils.Conv1D and fc.weight.shape == (32, 128)
    assert not fc.weight.requires_grad
    torch.testing.assert_close(m(ids).logits, adapted, rtol=1e-5, atol=1e-5)
