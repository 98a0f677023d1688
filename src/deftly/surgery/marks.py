"""What surgery leaves on a model besides the new modules: the kind of layer each structured layer replaced
(so ``deftly.densify`` can restore a Hugging Face ``Conv1D`` with its ``(in, out)`` weight layout), and a
guard on a Hugging Face model's own ``save_pretrained``.

transformers' ``model.save_pretrained`` would write a structured model's state dict as if it were the
dense architecture; ``from_pretrained`` then finds none of the dense weights and fills those layers with
random ones, with only its missing/unexpected-keys table as a hint. So a model that structurize / adapt /
``deftly.load`` touched gets an instance-level ``save_pretrained`` that refuses while the model holds
structured layers or adapters (naming them and pointing to ``deftly.save_pretrained``) and is transformers'
own method again once there are none (after ``deftly.densify`` / ``merge_and_unload``). The guard is an
attribute of the instance holding the model: ``copy.deepcopy`` and pickling carry it to the copy.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .modules import is_conv1d, structured_modules

__all__ = ["ORIGINAL_KINDS", "SavePretrainedGuard", "guard_save_pretrained", "original_kind", "record_origin"]

#: the layer kinds a structured layer can stand for (``deftly.densify`` rebuilds one of them)
ORIGINAL_KINDS = ("Linear", "Conv1D")


def record_origin(layer: nn.Module, replaced: nn.Module) -> None:
    """Remember on ``layer`` which kind of dense layer it replaces (``"Conv1D"`` or ``"Linear"``)."""
    # a plain attribute; torch annotates nn.Module.__setattr__'s value as Tensor | Module only (it takes any)
    layer.original_kind = "Conv1D" if is_conv1d(replaced) else "Linear"  # type: ignore[assignment]


def original_kind(layer: nn.Module) -> str:
    """``"Conv1D"`` or ``"Linear"`` (the default for layers built outside surgery)."""
    kind = getattr(layer, "original_kind", "Linear")
    return kind if kind in ORIGINAL_KINDS else "Linear"


class SavePretrainedGuard:
    """An instance-level ``save_pretrained``: transformers' method, refused while the model holds deftly
    layers (see :mod:`deftly.surgery.marks`). An object holding the model, so that ``copy.deepcopy`` and
    pickling carry it over to the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        wrapped = structured_modules(model)
        if wrapped:
            names = [n for n, _ in wrapped]
            shown = ", ".join(names[:4]) + (f" ... ({len(names) - 4} more)" if len(names) > 4 else "")
            raise ValueError(
                f"{type(model).__name__}.save_pretrained: the model holds {len(names)} deftly structured "
                f"layer(s) or adapter(s) ({shown}); transformers would save it as the dense architecture and "
                f"from_pretrained would silently fill those layers with random weights. Use "
                f"deftly.save_pretrained(model, {str(save_directory)!r}) and deftly.from_pretrained(...) to keep "
                f"the structure, or deftly.densify(model) first to save a plain transformers model")
        cls: Any = type(model)  # a transformers PreTrainedModel (checked by guard_save_pretrained)
        return cls.save_pretrained(model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<deftly guard of {type(self.model).__name__}.save_pretrained>"


def guard_save_pretrained(model: nn.Module) -> None:
    """Install the guard on a Hugging Face model (one with ``config`` and a ``save_pretrained`` method);
    other models are left alone. Idempotent."""
    if not callable(getattr(type(model), "save_pretrained", None)) or not hasattr(model, "config"):
        return
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, SavePretrainedGuard) and current.model is model:
        return
    # an instance attribute shadowing the method; torch annotates nn.Module.__setattr__'s value as
    # Tensor | Module only (it takes any)
    model.save_pretrained = SavePretrainedGuard(model)  # type: ignore[assignment]
