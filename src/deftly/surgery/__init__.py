"""Model surgery: swap a model's dense layers for structured ones (``structurize``), add structured adapters
(``adapt``), project a dense weight onto a structure (``project``), and the one budget solver both use.

Match -> build -> swap (:mod:`~deftly.surgery.template`): :func:`~deftly.surgery.template.match_layers`
resolves a :class:`StructureConfig` to one plan per layer, :func:`~deftly.surgery.budget.choose_hparams`
picks the hyperparameters, each method supplies one build hook to
:func:`~deftly.surgery.template.replace_layers`, and nothing is swapped until everything is built.
:func:`~deftly.surgery.plan.plan` counts what a structurized model would hold, on the meta device.
"""

from .adapters import Adapters, StructuredAdapter, adapt, merge, merge_and_unload, unmerge
from .budget import choose_hparams, dense_count
from .config import StructureConfig
from .modules import dense_weight, is_linear_like, linear_modules, set_module, structured_modules
from .project import project
from .report import LayerReport, SurgeryReport
from .structurize import collect_calibration, structurize
from .template import match_layers

__all__ = [
    "Adapters",
    "LayerReport",
    "StructureConfig",
    "StructuredAdapter",
    "SurgeryReport",
    "adapt",
    "choose_hparams",
    "collect_calibration",
    "dense_count",
    "dense_weight",
    "is_linear_like",
    "linear_modules",
    "match_layers",
    "merge",
    "merge_and_unload",
    "project",
    "set_module",
    "structured_modules",
    "structurize",
    "unmerge",
]
