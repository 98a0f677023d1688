"""deftly: structured matrices as drop-in ``nn.Linear`` layers.

Monarch, butterfly, Block Tensor-Train, low-rank, block-diagonal, banded, Kronecker and more, each with
``to_dense()``, exact parameter and FLOP counts, a structure-aware init and a slow reference multiply.

>>> import deftly
>>> layer = deftly.make("monarch", 1024, 4096, nblocks=32)
"""

from .base import StructuredLinear
from .registry import get, make, register, structures

__all__ = ["StructuredLinear", "get", "make", "register", "structures"]
__version__ = "0.1.0"
