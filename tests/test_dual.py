"""Dual numbers as 2x2 matrices: ε² = 0, f(aI + ε) = f(a) I + f'(a) ε for polynomials and matrix
functions, Fréchet derivatives by the block form, and directional derivatives of every deftly structure
(alone and inside a small tanh network) equal to ``torch.func.jvp``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deftly
from deftly import dual as D

F64 = torch.float64
# torch.func.jvp itself calls the deprecated torch.jit.script in torch 2.13; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def test_eps_is_nilpotent_and_products_follow_the_product_rule():
    E = D.eps()
    assert torch.equal(E @ E, torch.zeros(2, 2, dtype=F64))
    a, b, c, d = 1.5, -2.0, 0.25, 3.0
    P = D.mul(D.dual(torch.tensor(a), torch.tensor(b)), D.dual(torch.tensor(c), torch.tensor(d)))
    assert D.primal(P).item() == a * c and D.tangent(P).item() == a * d + b * c
    assert P[1, 0].item() == 0 and P[1, 1].item() == a * c


def test_polynomials():
    coeffs = [3.0, 0.0, -2.0, 1.0, 0.5]  # 3a^4 - 2a^2 + a + 0.5
    a = torch.linspace(-2, 2, 9, dtype=F64)
    val, der = D.derivative(lambda X: D.polyval(coeffs, X), a)
    np.testing.assert_allclose(val.numpy(), np.polyval(coeffs, a.numpy()), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(der.numpy(), np.polyval(np.polyder(coeffs), a.numpy()), rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("name,f,df", [
    ("exp", np.exp, np.exp),
    ("sin", np.sin, np.cos),
    ("cos", np.cos, lambda a: -np.sin(a)),
    ("tanh", np.tanh, lambda a: 1 - np.tanh(a) ** 2),
    ("reciprocal", lambda a: 1 / a, lambda a: -1 / a ** 2),
])
def test_matrix_functions_give_the_derivative(name, f, df):
    a = torch.tensor([-1.3, -0.2, 0.7, 2.1], dtype=F64)
    val, der = D.derivative(getattr(D, name), a)
    np.testing.assert_allclose(val.numpy(), f(a.numpy()), rtol=1e-12)
    np.testing.assert_allclose(der.numpy(), df(a.numpy()), rtol=1e-11)


def test_chain_rule_through_composed_matrix_functions():
    a = torch.tensor([0.3, 1.1], dtype=F64)
    _, der = D.derivative(lambda X: D.sin(D.exp(D.polyval([1.0, 0.0, 0.0], X))), a)  # sin(exp(a^2))
    want = torch.cos(torch.exp(a ** 2)) * torch.exp(a ** 2) * 2 * a
    torch.testing.assert_close(der, want, rtol=1e-12, atol=1e-12)


def test_frechet_derivative_of_matrix_exp_and_polynomial():
    torch.manual_seed(0)
    A, E = torch.randn(5, 5, dtype=F64), torch.randn(5, 5, dtype=F64)
    fA, L = D.frechet(torch.linalg.matrix_exp, A, E)
    want_f, want_L = torch.func.jvp(torch.linalg.matrix_exp, (A,), (E,))
    torch.testing.assert_close(fA, want_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L, want_L, rtol=1e-10, atol=1e-10)
    _, Lp = D.frechet(lambda M: M @ M @ M + 2 * M, A, E)  # L = A^2 E + A E A + E A^2 + 2E
    torch.testing.assert_close(Lp, A @ A @ E + A @ E @ A + E @ A @ A + 2 * E, rtol=1e-12, atol=1e-12)


def test_dual_matrix_product_carries_the_derivative_through_matmul():
    torch.manual_seed(1)
    A, dA = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    B, dB = torch.randn(4, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    P = D.matmul(D.dual(A, dA), D.dual(B, dB))
    torch.testing.assert_close(D.primal(P), A @ B)
    torch.testing.assert_close(D.tangent(P), dA @ B + A @ dB)
    Pb = D.to_block(A @ torch.ones(4, 3, dtype=F64), dA @ torch.ones(4, 3, dtype=F64))
    assert Pb.shape == (6, 6) and torch.equal(Pb[3:, :3], torch.zeros(3, 3, dtype=F64))


CASES = [(name, p) for name in deftly.structures() for p in deftly.get(name).examples(6, 10)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}{v}" for k, v in c[1].items()))
def test_layer_directional_derivative_equals_jvp(case):
    name, params = case
    torch.manual_seed(2)
    layer = deftly.make(name, 6, 10, dtype=F64, **params)
    x, v = torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)
    y, t = D.layer_jvp(layer, x, v)
    y_ref, t_ref = torch.func.jvp(layer, (x,), (v,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)
    # a small network: tanh between two layers of the structure, all in dual arithmetic
    cls = deftly.get(name)
    second = deftly.make(name, 10, 6, dtype=F64, **(params if params in cls.examples(10, 6)
                                                      else cls.examples(10, 6)[0]))
    if second.to_dense().dtype.is_complex and not layer.to_dense().dtype.is_complex:
        second = deftly.make(name, 10, 6, dtype=F64, **cls.examples(10, 6)[0])

    def net(x):
        return second(torch.tanh(layer(x)))

    Y = D.affine(second, D.tanh(D.affine(layer, D.dual(x, v))))
    y_ref, t_ref = torch.func.jvp(net, (x,), (v,))
    torch.testing.assert_close(D.primal(Y), y_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(D.tangent(Y), t_ref, rtol=1e-11, atol=1e-11)


def test_parameter_direction_through_the_butterfly_factors():
    """W = M_k ... M_1 P: replacing each sparse factor by its dual [[M, dM], [0, M]] and multiplying
    gives dW, the derivative of ``to_dense`` along a twiddle direction."""
    torch.manual_seed(3)
    layer = deftly.make("butterfly", 8, 8, bias=False, depth=2, complex=True, dtype=F64)
    delta = torch.randn_like(layer.twiddle)
    other = deftly.make("butterfly", 8, 8, bias=False, depth=2, complex=True, dtype=F64)
    with torch.no_grad():
        other.twiddle.copy_(delta)
    block = None
    for M, dM in zip(layer.factors(), other.factors()):  # factors are linear in their twiddles
        B = D.to_block(M.detach(), dM.detach())
        block = B if block is None else B @ block
    W, dW = block[:8, :8], block[:8, 8:]

    eye = torch.eye(8, dtype=torch.complex128)

    def dense(tw):  # the fast forward on the identity: rows are W^T
        return torch.func.functional_call(layer, {"twiddle": tw}, (eye,)).T

    W_ref, dW_ref = torch.func.jvp(dense, (layer.twiddle.detach(),), (delta,))
    # the butterfly's perm is 'none', so its dense form is exactly the factor product
    torch.testing.assert_close(W, W_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dW, dW_ref, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"shape \(\*, 2, 2\), got \(3,\)"):
        D.exp(torch.zeros(3))
