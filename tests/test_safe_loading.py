"""Safe loading: no pickle ever runs, and every bad file gives an error naming the file, the key and
expected vs found, leaving the model it was loading into unchanged.

Audit (grep of src/, tests/, examples/ for ``torch.load``, ``pickle``, ``np.load``): no ``torch.load`` and
no ``pickle`` import anywhere in ``src/deftly``; ``deftly.io.checkpoint`` (training checkpoints) and
``deftly.io.persist`` (``deftly.save``/``deftly.load``) read safetensors + JSON only; ``deftly.data`` reads
its cache with ``np.load(..., allow_pickle=False)``. The tests below feed each loader a pickle whose
unpickling would create a marker directory, and check that the marker never appears.

Covered, for every registered structure (registry-driven):

* ``deftly.io.checkpoint.load_checkpoint``: missing, empty, truncated (at many offsets), bit-flipped, a
  pickle, a foreign safetensors file -> ``FileNotFoundError``/``CheckpointError`` naming the file;
* a checkpoint's model/optimizer state against the model, through the checked loaders
  ``deftly.distributed.load_full_state_dict`` / ``load_full_optimizer_state_dict`` (the same code path as
  a distributed resume): wrong shape, wrong dtype, missing and extra keys;
* ``deftly.load`` (``deftly.io.persist``): truncated / pickled / reshaped / retyped / missing / extra weights,
  an unknown structure and invalid hyperparameters in ``deftly.json``;
* the training loop's resume (``deftly.train.loop.train(resume=True)``) with a checkpoint that does not
  fit the model (model or optimizer state): a ``ValueError`` naming the file and key, nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from structure_cases import BAD_EXAMPLES
from torch import nn

import deftly
from deftly import distributed as ddist
from deftly.io import persist
from deftly.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

safetensors = pytest.importorskip("safetensors")

IN, OUT = 12, 20
CASES = [pytest.param(n, deftly.get(n).examples(IN, OUT)[0], id=n) for n in deftly.structures()]


class Evil:
    """Unpickling this creates ``marker`` (a directory): proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def build(name, params, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(deftly.make(name, IN, OUT, **params), nn.Tanh(), nn.Linear(OUT, 4))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert set(now) == set(state), "the model's keys changed"
    assert all(torch.equal(now[k], state[k]) for k in state), \
        [k for k in state if not torch.equal(now[k], state[k])]
    assert [type(m) for m in model.modules()] == types, "the model's modules changed"


def shapes_named(msg: str, *shapes) -> bool:
    """The message names every shape, written as a tuple, a list or a torch.Size."""
    return all(any(f in msg for f in (str(tuple(s)), str(list(s)), str(torch.Size(s)))) for s in shapes)


# --------------------------------------------------------------------------- the audit
def test_no_pickle_loading_in_the_library():
    root = Path(deftly.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"\btorch\.load\(", r"\bpickle\.loads?\(", r"^\s*import pickle", r"allow_pickle\s*=\s*True",
                        r"weights_only\s*=\s*False"):
            for m in re.finditer(pattern, text, flags=re.MULTILINE):
                offenders.append(f"{path.relative_to(root)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- load_checkpoint: the file
@pytest.fixture
def ckpt(tmp_path):
    model = build("dense", {})
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, IN)).sum().backward()
    opt.step()
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1})
    return path


def test_checkpoint_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.ckpt"))):
        load_checkpoint(tmp_path / "nope.ckpt")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(empty))):
        load_checkpoint(empty)


def test_checkpoint_truncated_anywhere(ckpt):
    raw = ckpt.read_bytes()
    cuts = sorted({1, 7, 8, 9, 40, len(raw) // 3, len(raw) // 2, len(raw) - 8, len(raw) - 1})
    for cut in cuts:
        ckpt.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(ckpt))):
            load_checkpoint(ckpt)


def test_checkpoint_bit_flip_is_caught(ckpt):
    raw = bytearray(ckpt.read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor's bytes
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))}.*checksum"):
        load_checkpoint(ckpt)


def test_checkpoint_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"model": Evil(marker)}, bad)  # what a stranger's "checkpoint.pt" may hold
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        load_checkpoint(bad)
    assert not marker.exists(), "load_checkpoint unpickled the file"


def test_checkpoint_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*not a deftly checkpoint"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- a checkpoint vs the model
def _tamper(state: dict, how: str, key: str) -> tuple[dict, str, str]:
    """(tampered state, expected text, found text) for the error message."""
    bad = dict(state)
    t = bad[key]
    if how == "shape":
        bad[key] = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
        return bad, str(list(t.shape)), str(list(bad[key].shape))
    if how == "dtype":
        other = torch.float64 if t.dtype != torch.float64 else torch.float32
        bad[key] = t.to(other)
        return bad, str(t.dtype), str(other)
    if how == "missing":
        del bad[key]
        return bad, key, "missing"
    bad["0.not_a_weight"] = torch.zeros(3)
    return bad, "0.not_a_weight", "unexpected"


@pytest.mark.parametrize("how", ["shape", "dtype", "missing", "extra"])
@pytest.mark.parametrize(("name", "params"), CASES)
def test_checkpoint_state_must_fit_the_model(tmp_path, name, params, how):
    source = build(name, params, seed=1)
    path = tmp_path / "model.ckpt"
    key = next(k for k in source.state_dict() if k.startswith("0.") and not k.endswith("bias"))
    good = source.state_dict()
    bad, expected, found = _tamper(good, how, key)
    save_checkpoint(path, {"model": bad})
    target = build(name, params, seed=2)
    snap = snapshot(target)
    with pytest.raises(ValueError) as info:
        ddist.load_full_state_dict(target, load_checkpoint(path)["model"], source=str(path))
    msg = str(info.value)
    assert str(path) in msg and (key in msg or how == "extra") and expected in msg and found in msg, msg
    assert_unchanged(target, snap)
    # the good checkpoint loads, and then the models agree
    save_checkpoint(path, {"model": good})
    ddist.load_full_state_dict(target, load_checkpoint(path)["model"], source=str(path))
    x = torch.randn(5, IN)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_checkpoint_optimizer_state_must_fit(tmp_path, name, params):
    model = build(name, params)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, IN)).pow(2).sum().backward()
    opt.step()
    state = ddist.full_optimizer_state_dict(model, opt)
    key = next(iter(state["state"]))
    state["state"][key]["exp_avg"] = torch.zeros(7, 7)
    path = tmp_path / "opt.ckpt"
    save_checkpoint(path, {"optimizer": state})
    fresh = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError) as info:
        ddist.load_full_optimizer_state_dict(model, fresh, load_checkpoint(path)["optimizer"], source=str(path))
    msg = str(info.value)
    assert str(path) in msg and key in msg and "exp_avg" in msg and "[7, 7]" in msg, msg
    assert not fresh.state, "the optimizer was changed"


# --------------------------------------------------------------------------- the training loop's resume
def test_train_resume_with_mismatched_checkpoint(tmp_path):
    from deftly.train.loop import TrainConfig, train

    cfg = TrainConfig(steps=2, lr=1e-3, mup=False, progress=False)
    x, y = torch.randn(8, IN), torch.randn(8, 4)

    def batch(step):
        return x, y

    def loss(model, b):
        return (model(b[0]) - b[1]).pow(2).mean()

    path = tmp_path / "run.ckpt"
    train(build("dense", {}), batch, loss, cfg, checkpoint_path=path)
    other = nn.Sequential(deftly.make("dense", IN, OUT), nn.Tanh(), nn.Linear(OUT, 5))  # head 20 -> 5, not 4
    snap = snapshot(other)
    with pytest.raises(ValueError) as info:
        train(other, batch, lambda m, b: m(b[0]).pow(2).mean(), cfg, checkpoint_path=path, resume=True)
    assert str(path) in str(info.value) and "2.weight" in str(info.value)
    assert_unchanged(other, snap)


# --------------------------------------------------------------------------- deftly.load


def needs_persist(f):  # kept as a marker for the deftly.load tests below
    return f


def base_model(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 4))


def _rewrite_weights(directory: Path, edit) -> None:
    """Rewrite model.safetensors through ``edit(tensors) -> tensors | bytes`` and record its new size and
    checksum in deftly.json, so that only the content (not the integrity check) is wrong."""
    from safetensors.torch import load_file, save_file

    wfile = directory / persist.WEIGHTS_FILE
    out = edit(load_file(str(wfile)))
    if isinstance(out, bytes):
        wfile.write_bytes(out)
    else:
        save_file(out, str(wfile), metadata={"format": persist.FORMAT})
    cfg_file = directory / persist.CONFIG_FILE
    cfg = json.loads(cfg_file.read_text())
    cfg["weights"]["bytes"] = wfile.stat().st_size
    cfg["weights"]["sha256"] = hashlib.sha256(wfile.read_bytes()).hexdigest()
    cfg_file.write_text(json.dumps(cfg))


def _edit_config(directory: Path, edit) -> None:
    cfg_file = directory / persist.CONFIG_FILE
    cfg = json.loads(cfg_file.read_text())
    edit(cfg)
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture
def saved(tmp_path, request):
    name, params = request.param
    model = build(name, params, seed=4)
    directory = tmp_path / "saved"
    deftly.save(model, directory)
    return name, params, model, directory


def _load_fails(directory: Path, *needles: str, exc=ValueError):
    target = base_model()
    snap = snapshot(target)
    with pytest.raises(exc) as info:
        deftly.load(target, directory)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_unchanged(target, snap)
    return msg


SAVED = [pytest.param((n, deftly.get(n).examples(IN, OUT)[0]), id=n) for n in deftly.structures()]


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_round_trip_then_damage(saved):
    _, _, model, directory = saved
    target = deftly.load(base_model(), directory)
    x = torch.randn(4, IN)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)
    wfile = directory / persist.WEIGHTS_FILE
    raw = wfile.read_bytes()
    wfile.write_bytes(raw[: len(raw) // 2])  # truncated copy
    _load_fails(directory, str(wfile), "truncated")
    wfile.write_bytes(raw)


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_pickle_never_runs(saved, tmp_path):
    _, _, _, directory = saved
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"0.bias": Evil(marker)}, evil)
    _rewrite_weights(directory, lambda t: evil.read_bytes())
    _load_fails(directory, str(directory / persist.WEIGHTS_FILE))
    assert not marker.exists(), "deftly.load unpickled the weights file"


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_wrong_shape(saved):
    _, _, model, directory = saved
    key = next(k for k in model.state_dict() if k.startswith("0.") and not k.endswith("bias"))
    shape = tuple(model.state_dict()[key].shape)
    bad_shape = (*shape[:-1], shape[-1] + 1)

    def edit(t):
        t[key] = torch.zeros(bad_shape, dtype=t[key].dtype)
        return t

    _rewrite_weights(directory, edit)
    msg = _load_fails(directory, str(directory / persist.WEIGHTS_FILE), key)
    assert shapes_named(msg, shape, bad_shape), msg


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_wrong_dtype(saved):
    _, _, model, directory = saved
    key = next(k for k in model.state_dict() if k.startswith("0.") and not k.endswith("bias"))

    def edit(t):
        t[key] = t[key].to(torch.float64)
        return t

    _rewrite_weights(directory, edit)
    _load_fails(directory, str(directory / persist.WEIGHTS_FILE), key, "float64", "float32")


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_missing_and_extra_weights(saved):
    _, _, model, directory = saved
    key = next(k for k in model.state_dict() if k.startswith("0."))
    original = (directory / persist.WEIGHTS_FILE).read_bytes()

    def drop(t):
        del t[key]
        return t

    _rewrite_weights(directory, drop)
    _load_fails(directory, str(directory / persist.WEIGHTS_FILE), key)
    _rewrite_weights(directory, lambda t: original)

    def add(t):
        t["0.stowaway"] = torch.zeros(2)
        return t

    _rewrite_weights(directory, add)
    _load_fails(directory, str(directory / persist.WEIGHTS_FILE), "0.stowaway")


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_unknown_structure(saved):
    directory = saved[3]

    def edit(cfg):
        cfg["layers"][0]["structure"] = "definitely-not-a-structure"

    _edit_config(directory, edit)
    _load_fails(directory, str(directory / persist.CONFIG_FILE), "definitely-not-a-structure")


@needs_persist
@pytest.mark.parametrize("saved", SAVED, indirect=True)
def test_deftly_load_invalid_hyperparameters(saved):
    name, _, _, directory = saved
    def refused(hp):  # BAD_EXAMPLES are bad for 16x16; keep those that are bad for this layer too
        try:
            deftly.make(name, IN, OUT, **hp)
        except (ValueError, TypeError):
            return True
        return False

    bad = [hp for hp in BAD_EXAMPLES.get(name, []) if refused(hp)]
    if not bad:
        bad = [{"definitely_not_a_param": 3}]
    for hp in bad:
        def edit(cfg, hp=hp):
            cfg["layers"][0]["hparams"] = {**cfg["layers"][0]["hparams"], **json.loads(json.dumps(hp))}

        backup = (directory / persist.CONFIG_FILE).read_text()
        _edit_config(directory, edit)
        msg = _load_fails(directory, str(directory / persist.CONFIG_FILE))
        assert any(k in msg for k in hp), (hp, msg)
        (directory / persist.CONFIG_FILE).write_text(backup)
