"""Adding a structure touches one new file: a toy structure written to its own module, imported, and taken
through make, the slow reference, float64 gradcheck, the budget solver, structurize, save/load and densify
with no other change to deftly."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from torch import nn

import deftly
from deftly.core import registry

TOY = textwrap.dedent('''
    """``toyband``: the main diagonal plus one superdiagonal of the (out, in) weight (a toy structure)."""
    import torch
    from torch import nn

    import deftly


    @deftly.register
    class ToyBand(deftly.StructuredLinear):
        name = "toyband"

        def __init__(self, in_features, out_features, bias=True, *, device=None, dtype=None):
            super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
            n = min(in_features, out_features)
            self.diag = nn.Parameter(torch.empty(n, **self._factory))  # W[i, i]
            self.upper = nn.Parameter(torch.empty(max(min(n, in_features - 1), 0), **self._factory))  # W[i, i+1]
            self.reset_parameters()

        def _reset_structure(self):
            with torch.no_grad():
                self.diag.uniform_(-1.0, 1.0)
                self.upper.uniform_(-1.0, 1.0)

        def _matmul(self, x):  # (batch, in) -> (batch, out)
            n, u = self.diag.numel(), self.upper.numel()
            y = x.new_zeros(x.shape[0], self.out_features)
            y[:, :n] = x[:, :n] * self.diag
            y[:, :u] = y[:, :u] + x[:, 1:u + 1] * self.upper
            return y

        def _reference_matmul(self, x):
            return x @ self.to_dense().T

        def to_dense(self):
            W = self.diag.new_zeros(self.out_features, self.in_features)
            n, u = self.diag.numel(), self.upper.numel()
            idx = torch.arange(n, device=W.device)
            W[idx, idx] = self.diag
            W[idx[:u], idx[:u] + 1] = self.upper
            return W

        @classmethod
        def param_count(cls, in_features, out_features):
            n = min(in_features, out_features)
            return n + max(min(n, in_features - 1), 0)

        @classmethod
        def flop_count(cls, in_features, out_features):
            return 2 * cls.param_count(in_features, out_features)
''')


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toyband.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toyband_structure", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        yield module.ToyBand
    finally:  # other tests iterate the registry: leave it as it was
        registry._REGISTRY.pop("toyband", None)
        sys.modules.pop(spec.name, None)


def test_a_new_structure_is_one_file(toy, tmp_path):
    assert "toyband" in deftly.structures()
    torch.manual_seed(0)
    layer = deftly.make("toyband", 7, 5, dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64)
    W = layer.to_dense()
    assert W.shape == (5, 7) and int((W != 0).sum()) == layer.num_params() - 5  # bias excluded
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias)
    torch.testing.assert_close(layer.reference_forward(x), layer(x))
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x.clone().requires_grad_(),))

    # surgery: budget solver + structurize + save/load + densify, all through the registry
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = nn.Sequential(*[m for m in model])
    report = deftly.structurize(model, deftly.StructureConfig(structure="toyband", target_modules=["0"],
                                                              budget=0.5))
    assert isinstance(model[0], toy) and report.layers[0].params_after == 15 + 8
    xin = torch.randn(4, 8)
    y = model(xin)
    deftly.save(model, tmp_path / "saved")
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    deftly.load(other, tmp_path / "saved")
    assert isinstance(other[0], toy)
    torch.testing.assert_close(other(xin), y)
    deftly.densify(other)
    assert type(other[0]) is nn.Linear and ref is not None
    torch.testing.assert_close(other(xin), y, rtol=1e-5, atol=1e-6)
