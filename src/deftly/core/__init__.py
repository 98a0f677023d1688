"""The bottom layer: the structured-layer base class, the registry, partitions of a feature axis, and the
numeric helpers of projection. Imports nothing else from deftly."""

from .base import StructuredLinear, check_int, init_uniform_
from .partition import Partition, balanced_factors, ceil_div
from .registry import get, make, register, structures

__all__ = ["Partition", "StructuredLinear", "balanced_factors", "ceil_div", "check_int", "get", "init_uniform_",
           "make", "register", "structures"]
