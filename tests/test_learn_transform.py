"""Learning a transform from data: a randomly initialised butterfly fitted by gradient descent to
``(x, T x)`` pairs recovers the DFT and the Hadamard matrix (Dao et al., ICML 2019), at n = 64."""

from __future__ import annotations

import pytest
import torch

import deftly.transforms as T
from deftly.transforms.learn import fit_transform, learnable_butterfly_for


@pytest.mark.parametrize("kind", ["dft", "hadamard"])
def test_random_butterfly_learns_the_transform(kind):
    n = 64
    target = T.dft(n, norm="ortho") if kind == "dft" else T.hadamard(n, norm="ortho")
    layer = learnable_butterfly_for(kind, n, dtype=torch.float64, seed=0)
    before = (layer.to_dense() - target.to_dense()).abs().pow(2).mean().sqrt().item()
    result = fit_transform(layer, target, steps=400, lr=0.1, seed=1)
    assert before > 0.1  # random start is far from the transform (entries have size 1/8)
    assert result.rmse <= 1e-4, result
    x = torch.randn(5, n, dtype=torch.float64)
    with torch.no_grad():  # the learned layer now *is* a fast transform
        assert (layer(x) - target(x)).abs().max().item() <= 1e-3


def test_a_butterfly_without_the_bitreversal_cannot_fit_the_dft():
    """The permutation matters: with perm='none' the same budget stalls far from the DFT."""
    n = 16
    import deftly

    torch.manual_seed(0)
    layer = deftly.make("butterfly", n, n, bias=False, complex=True, dtype=torch.float64)
    result = fit_transform(layer, T.dft(n, norm="ortho"), steps=300, lr=0.1)
    assert result.rmse > 1e-2
