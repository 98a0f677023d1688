"""Exact fast transforms as structured operators: DFT of any size, Hadamard, DCT, circulant, Toeplitz,
circular convolution and differentiation matrices.

Every transform is an :class:`~deftly.transforms.base.Operator` — an ``nn.Module`` with no parameters whose
multiply is a product of sparse factors (permutation gathers, butterfly stages, diagonals,
Kronecker-with-identity blocks) — with ``to_dense()`` built from those factors, a slow reference multiply
and exact FLOP counts. Default precision is complex128 / float64; pass ``dtype=`` for others. The one
learnable layer here, :class:`CircularConv1d`, is a :class:`deftly.StructuredLinear` (a drop-in
``nn.Linear``) computed with these factors.

>>> import torch, deftly.transforms as T
>>> F = T.dft(210)                      # mixed radix 2 x 3 x 5 x 7
>>> y = F(torch.randn(4, 210, dtype=torch.complex128))
"""

from .bluestein import Bluestein, bluestein
from .derivative import Derivative, derivative, grid
from .dft import DFT, Hadamard, dft, hadamard, idft
from .operators import (
                        Compose,
                        DenseMatrix,
                        Diagonal,
                        Gather,
                        KronIdentity,
                        LayerOperator,
                        Operator,
                        Radix2,
                        RealPart,
                        Scale,
                        SparseMatrix,
                        Sum,
                        ToComplex,
)
from .relatives import DCT, Circulant, CircularConv1d, Toeplitz, circulant, dct, toeplitz

__all__ = [
                        "DCT",
                        "DFT",
                        "Bluestein",
                        "Circulant",
                        "CircularConv1d",
                        "Compose",
                        "DenseMatrix",
                        "Derivative",
                        "Diagonal",
                        "Gather",
                        "Hadamard",
                        "KronIdentity",
                        "LayerOperator",
                        "Operator",
                        "Radix2",
                        "RealPart",
                        "Scale",
                        "SparseMatrix",
                        "Sum",
                        "ToComplex",
                        "Toeplitz",
                        "bluestein",
                        "circulant",
                        "dct",
                        "derivative",
                        "dft",
                        "grid",
                        "hadamard",
                        "idft",
                        "toeplitz",
]
