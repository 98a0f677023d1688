"""Hugging Face round trip of structured and adapted models: ``deftly.save_pretrained`` /
``deftly.from_pretrained``.

``deftly.save_pretrained(model, dir)`` writes, for a transformers model holding deftly structured layers
or adapters:

* ``config.json`` (``model.config.save_pretrained``, with ``architectures`` and ``dtype`` set as
  transformers' own ``save_pretrained`` sets them) and ``generation_config.json`` for generative models;
* ``deftly.json`` + ``deftly.safetensors``: the format of :func:`deftly.save` (:mod:`deftly.io.persist`),
  with a ``"huggingface"`` entry (model class, model type, transformers version). The weights file is
  deliberately not called ``model.safetensors``: ``AutoModel.from_pretrained(dir)`` then fails loudly
  ("no file named model.safetensors") instead of loading the dense architecture with random weights in
  place of the structured layers.

``deftly.from_pretrained(dir)`` reads ``config.json`` (offline), builds the class named by its
``architectures`` (the same class that was saved), re-applies the surgery and loads the weights with
:func:`deftly.load` — every check of ``deftly.load`` applies — and returns the model in eval mode, with
the same outputs. No other argument, no network.

A model with no structured layer or adapter left (a plain model, or one after ``deftly.densify`` /
``merge_and_unload``) is saved by transformers' own ``save_pretrained`` (so ``AutoModel`` reads it), and
``from_pretrained`` on a folder without ``deftly.json`` is the class's own ``from_pretrained``
(``local_files_only``). A folder never mixes the two: saving one kind where the other kind's weights lie
is refused rather than leaving a stale file that a loader would pick up.

transformers' own ``model.save_pretrained`` on a structured model is refused with an error pointing here
(see :mod:`deftly.surgery.marks`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from . import persist
from .persist import CONFIG_FILE, DeftlyLoadError

__all__ = ["HF_WEIGHTS_FILES", "WEIGHTS_FILE", "from_pretrained", "save_pretrained"]

#: the weights file of a deftly Hugging Face folder (not a name transformers looks for)
WEIGHTS_FILE = "deftly.safetensors"
#: transformers' weights files: a deftly folder must not hold one
HF_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def _transformers(who: str) -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"{who} needs the 'transformers' package: pip install transformers") from None
    return transformers


def _check_hf_model(model: Any, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)) \
            or not callable(getattr(type(model), "save_pretrained", None)):
        raise TypeError(f"{who}: {type(model).__name__} is not a Hugging Face transformers model (no config with "
                        f"save_pretrained); use deftly.save(model, dir) / deftly.load(fresh_model, dir)")


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save a (structurized or adapted) transformers model so that :func:`from_pretrained` rebuilds it;
    returns the directory. See :mod:`deftly.io.hf`."""
    from ..surgery.modules import structured_modules

    who = "deftly.save_pretrained"
    _check_hf_model(model, who)
    hf_model: Any = model  # a transformers PreTrainedModel (checked above; transformers is optional)
    transformers = _transformers(who)
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{who}: {path} exists and is not a directory")
    if not structured_modules(model):  # nothing of deftly's left: transformers' own format
        stale = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if (path / f).exists()]
        if stale:
            raise FileExistsError(f"{who}: {path} holds a structured save ({', '.join(stale)}) that "
                                  f"deftly.from_pretrained would read instead of this plain model; save to "
                                  f"another directory or delete those files")
        # the class's method (the instance's may be deftly's guard)
        type(hf_model).save_pretrained(model, path)
        return path
    stale = [f for f in HF_WEIGHTS_FILES if (path / f).exists()]
    if stale:
        raise FileExistsError(f"{who}: {path} already holds transformers weights ({', '.join(stale)}) that "
                              f"AutoModel.from_pretrained would load as this model's dense weights; save to "
                              f"another directory or delete those files")
    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    extra = {"huggingface": {"model_class": type(model).__name__,
                             "model_type": getattr(config, "model_type", None),
                             "transformers_version": transformers.__version__,
                             "load_with": "deftly.from_pretrained(directory)"}}
    path.mkdir(parents=True, exist_ok=True)
    persist.write(model, path, weights_file=WEIGHTS_FILE, extra=extra, who=who)
    config.save_pretrained(path)
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and getattr(model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(path)
    return path


def _model_class(transformers: Any, name: str, path: Path) -> Any:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise DeftlyLoadError(f"deftly.from_pretrained: {path / 'config.json'} names the model class {name!r}, "
                              f"which transformers {transformers.__version__} does not have (custom code is not "
                              f"run); build the model yourself and call deftly.load(model, {str(path)!r})")
    return cls


def from_pretrained(directory: str | os.PathLike[str]) -> nn.Module:
    """The model saved by :func:`save_pretrained` in ``directory``: same class, same structure, same
    weights, eval mode. Offline. See :mod:`deftly.io.hf`."""
    who = "deftly.from_pretrained"
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: {path} is not a directory; save a model there first with "
                                f"deftly.save_pretrained(model, {str(path)!r})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{who}: {path} has no config.json (found: "
                                f"{', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'}); it was not "
                                f"written by deftly.save_pretrained or transformers' save_pretrained"
                                + ("; for a deftly.save folder use deftly.load(fresh_model, dir)"
                                   if (path / CONFIG_FILE).is_file() else ""))
    transformers = _transformers(who)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if not (path / CONFIG_FILE).is_file():  # a plain transformers folder
        archs = getattr(config, "architectures", None) or []
        if not archs:
            raise DeftlyLoadError(f"{who}: {path / 'config.json'} has no 'architectures' entry naming the model "
                                  f"class; load it with the class you want (e.g. transformers.AutoModel)")
        return _model_class(transformers, archs[0], path).from_pretrained(path, local_files_only=True)
    cfg = persist._read_config(path)
    hf = cfg.get("huggingface")
    if not isinstance(hf, dict) or "model_class" not in hf:
        raise DeftlyLoadError(f"{who}: {path / CONFIG_FILE} was written by deftly.save, not "
                              f"deftly.save_pretrained (it has no 'huggingface' entry); build the model and "
                              f"call deftly.load(model, {str(path)!r})")
    name = hf["model_class"]
    archs = getattr(config, "architectures", None) or []
    if archs and archs[0] != name:
        raise DeftlyLoadError(f"{who}: {path / 'config.json'} names {archs[0]!r} but {CONFIG_FILE} was saved "
                              f"from {name!r}; the files come from different saves — save the model again")
    cls = _model_class(transformers, name, path)
    model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    gen_file = path / "generation_config.json"
    if gen_file.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    model.eval()
    persist.load(model, path)
    return model
