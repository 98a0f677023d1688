"""Exact fast transforms: DFT of any size (radix-2, mixed radix, Bluestein) against numpy.fft, Hadamard,
DCT-II, circulant and Toeplitz against scipy, the circular convolution layer, differentiation matrices,
and the three paths (fast, loop reference, product of sparse factors) agreeing."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

import deftly
import deftly.transforms as T
from deftly.transforms.operators import REAL_PART, Compose, Radix2

C128, F64 = torch.complex128, torch.float64
KNOWN_N = [1, 2, 3, 4, 8, 12, 15, 16, 17, 64, 100, 128, 210, 1024, 4096]


def tol(n):
    return 1e-10 * math.sqrt(n) * math.log2(n + 1)


def crandn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g,
                                                                                   dtype=F64))


# ------------------------------------------------------------------------------ DFT known answers
@pytest.mark.parametrize("n", KNOWN_N)
@pytest.mark.parametrize("prime", ["auto", "bluestein"])
def test_dft_matches_numpy(n, prime):
    F = T.dft(n, prime=prime)
    x = crandn(6, n, seed=n)
    y = F(x)
    assert y.dtype == C128 and y.shape == (6, n)
    assert np.abs(y.numpy() - np.fft.fft(x.numpy(), axis=-1)).max() <= tol(n)
    if n <= 1024:  # the product of the sparse factors, independent of the fast path
        W = F.to_dense().numpy()
        assert np.abs(W - np.fft.fft(np.eye(n), axis=0)).max() <= tol(n)


@pytest.mark.parametrize("n", [3, 12, 15, 17, 100, 210])
def test_dense_prime_blocks_match_numpy(n):
    F = T.dft(n, prime="dense")
    x = crandn(3, n)
    assert np.abs(F(x).numpy() - np.fft.fft(x.numpy())).max() <= tol(n)


def test_prime_sizes_use_bluestein_when_cheaper():
    big = T.dft(1009)  # prime: dense would cost 8 * 1009^2 FLOPs per row
    assert any(type(m).__name__ == "Bluestein" for m in big.modules())
    assert big.flops() < 8 * 1009 ** 2 / 20
    x = crandn(2, 1009)
    assert np.abs(big(x).numpy() - np.fft.fft(x.numpy())).max() <= tol(1009)
    small = T.dft(3)  # a 3x3 block is cheaper than a 4-point-FFT-based chirp
    assert not any(type(m).__name__ == "Bluestein" for m in small.modules())
    for p in (5, 7, 13, 19, 23, 31, 37):  # "auto" takes the cheaper of the two
        assert T.dft(p).flops() == min(T.dft(p, prime="dense").flops(), T.dft(p, prime="bluestein").flops())


@pytest.mark.parametrize("n", [1, 5, 12, 17, 64])
@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
def test_inverse_and_norms_match_numpy(n, norm):
    x = crandn(4, n, seed=1)
    fwd, inv = T.dft(n, norm=norm), T.dft(n, inverse=True, norm=norm)
    np.testing.assert_allclose(fwd(x).numpy(), np.fft.fft(x.numpy(), norm=norm), atol=tol(n))
    np.testing.assert_allclose(inv(x).numpy(), np.fft.ifft(x.numpy(), norm=norm), atol=tol(n))
    np.testing.assert_allclose(inv(fwd(x)).numpy(), x.numpy(), atol=tol(n))
    assert T.idft(n, norm=norm).to_dense().numpy() == pytest.approx(inv.to_dense().numpy())


@pytest.mark.parametrize("n", [1, 2, 6, 8, 15, 17, 30, 64])
def test_fast_equals_loop_reference(n):
    for op in (T.dft(n), T.dft(n, prime="bluestein", inverse=True)):
        x = crandn(3, n, seed=2)
        torch.testing.assert_close(op(x), op.reference_forward(x), rtol=0, atol=1e-12)


def test_real_input_and_leading_dims_and_complex64():
    F = T.dft(12)
    x = torch.randn(2, 3, 12, dtype=F64)
    np.testing.assert_allclose(F(x).numpy(), np.fft.fft(x.numpy()), atol=1e-13)
    F32 = T.dft(48, dtype=torch.complex64)
    x = crandn(5, 48).to(torch.complex64)
    y = F32(x)
    assert y.dtype == torch.complex64
    assert np.abs(y.numpy() - np.fft.fft(x.numpy().astype(np.complex128))).max() < 1e-4


# ------------------------------------------------------------------------------ factors and FLOPs
def test_radix2_is_bitreversal_then_stride_factors():
    n = 32
    F = T.dft(n)
    (op,) = F.ops
    assert isinstance(op, Radix2)
    factors = op.sparse_factors()
    assert len(factors) == 1 + 5
    P = factors[0].to_dense()
    assert torch.equal(P.abs().sum(0), torch.ones(n, dtype=F64)) and torch.equal(P.abs().sum(1),
                                                                                 torch.ones(n, dtype=F64))
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for j, S in enumerate(factors[1:]):
        s = 1 << j
        want = (r // (2 * s) == c // (2 * s)) & (r % s == c % s)
        assert ((S.to_dense().abs().numpy() > 0) == want).all()


@pytest.mark.parametrize("k", [1, 4, 10, 12])
def test_radix2_flops_are_5nlogn_minus_trivial_twiddles(k):
    n = 1 << k
    # stage 1: two complex adds per pair (2n); stages 2..k: a complex multiply + two adds (5n)
    assert T.dft(n).flops(batch=3) == 3 * (5 * n * k - 3 * n)
    assert T.hadamard(n).flops() == n * k  # one real add per entry per stage


@pytest.mark.parametrize("n", [12, 100, 210, 1009, 1024, 3 * 1024, 4099, 6000])
def test_flops_are_n_log_n(n):
    f = T.dft(n).flops()
    # worst case is Bluestein on a prime just above a power of two: M < 4n inner FFT size gives
    # 12n + 2 (5 M log2 M - 3M) + 6M <= 40 n log2 n + 116 n
    assert f <= 40 * n * math.log2(n) + 116 * n, (n, f, f / (n * math.log2(n)))
    assert f < 8 * n * n  # below the dense complex matmul


def test_bluestein_flop_count():
    n = 17
    F = T.dft(n, prime="bluestein")
    M = 64  # smallest power of two >= 2n - 1
    radix2 = 5 * M * 6 - 3 * M
    # chirp (6n), FFT_M, diag (6M), inverse FFT_M, chirp (6n)
    assert F.flops() == 6 * n + radix2 + 6 * M + radix2 + 6 * n


def test_operator_composes_with_library_layers():
    torch.manual_seed(0)
    lin = deftly.make("dense", 16, 16, bias=False, dtype=C128)
    op = Compose([T.dft(16), lin])
    x = crandn(3, 16)
    expect = x @ (lin.to_dense() @ T.dft(16).to_dense()).T
    torch.testing.assert_close(op(x), expect.detach())
    torch.testing.assert_close(op.to_dense(), (lin.to_dense() @ T.dft(16).to_dense()).detach())
    assert op.flops() == T.dft(16).flops() + lin.flops()
    # an operator is its own kind of module (not a layer); the layer inside keeps its trainable weights
    assert isinstance(op, T.Operator) and not isinstance(op, deftly.StructuredLinear)
    assert op.num_params() == 256 and op.bias is None
    op(x).abs().pow(2).sum().backward()
    (w,) = lin.parameters()
    assert w.grad is not None and w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ relatives
@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 1024])
def test_hadamard_is_sylvester(n):
    H = T.hadamard(n)
    assert np.array_equal(H.to_dense().numpy(), scipy.linalg.hadamard(n))
    x = torch.randn(3, n, dtype=F64)
    np.testing.assert_allclose(H(x).numpy(), x.numpy() @ scipy.linalg.hadamard(n).T, atol=1e-11)
    Ho = T.hadamard(n, norm="ortho")
    np.testing.assert_allclose(Ho.to_dense().numpy() @ Ho.to_dense().numpy().T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 15, 17, 64, 100, 1000])
def test_dct_matches_scipy(n):
    x = torch.randn(4, n, dtype=F64)
    D = T.dct(n)
    y = D(x)
    assert y.dtype == F64
    assert np.abs(y.numpy() - scipy.fft.dct(x.numpy(), norm="ortho")).max() <= tol(n)
    if n <= 100:
        W = D.to_dense().numpy()
        assert np.abs(W - scipy.fft.dct(np.eye(n), norm="ortho", axis=0)).max() <= tol(n)
        np.testing.assert_allclose(W @ W.T, np.eye(n), atol=1e-13)
        torch.testing.assert_close(D.reference_forward(x), y, rtol=0, atol=1e-12)
    Db = T.dct(n, norm="backward")
    assert np.abs(Db(x).numpy() - scipy.fft.dct(x.numpy())).max() <= 2 * math.sqrt(n) * tol(n)


def test_dct_factors_end_with_real_part():
    factors = T.dct(8).sparse_factors()
    assert factors[-1] == REAL_PART and sum(isinstance(f, str) for f in factors) == 1


@pytest.mark.parametrize("n", [1, 5, 16, 30])
@pytest.mark.parametrize("cplx", [False, True])
def test_circulant_matches_scipy(n, cplx):
    c = crandn(n, seed=3) if cplx else torch.randn(n, dtype=F64)
    C = T.circulant(c)
    x = crandn(3, n, seed=4) if cplx else torch.randn(3, n, dtype=F64)
    y = C(x)
    assert y.dtype == (C128 if cplx else F64)
    ref = scipy.linalg.circulant(c.numpy())
    np.testing.assert_allclose(y.numpy(), x.numpy() @ ref.T, atol=1e-12)
    np.testing.assert_allclose(C.to_dense().numpy(), ref, atol=1e-13)
    torch.testing.assert_close(C.reference_forward(x), y, rtol=0, atol=1e-12)


def test_circulant_eigenvectors_are_fourier_modes():
    n = 12
    c = torch.randn(n, dtype=F64)
    C = T.circulant(c, dtype=C128)
    lam = np.fft.fft(c.numpy())
    for k in (0, 1, 5):
        v = np.exp(2j * np.pi * k * np.arange(n) / n)
        np.testing.assert_allclose(C(torch.tensor(v)).numpy(), lam[k] * v, atol=1e-12)


@pytest.mark.parametrize("m,n", [(1, 1), (5, 3), (3, 7), (16, 16), (33, 20)])
def test_toeplitz_matches_scipy(m, n):
    c, r = crandn(m, seed=5), crandn(n, seed=6)
    Tp = T.toeplitz(c, r)
    assert Tp.L >= m + n - 1 and Tp.L & (Tp.L - 1) == 0
    ref = scipy.linalg.toeplitz(c.numpy(), r.numpy())
    x = crandn(2, n, seed=7)
    np.testing.assert_allclose(Tp(x).numpy(), x.numpy() @ ref.T, atol=1e-12)
    np.testing.assert_allclose(Tp.to_dense().numpy(), ref, atol=1e-13)
    herm = T.toeplitz(c)  # r = conj(c), as scipy
    np.testing.assert_allclose(herm.to_dense().numpy(), scipy.linalg.toeplitz(c.numpy()), atol=1e-13)
    real = T.toeplitz(c.real, r.real)
    assert real(x.real).dtype == F64


# ------------------------------------------------------------------------------ convolution layer
def test_circular_conv_layer():
    torch.manual_seed(0)
    conv = T.CircularConv1d(20, 20, kernel_size=5, dtype=F64)
    x = torch.randn(4, 20, dtype=F64)
    w = np.zeros(20)
    w[:5] = conv.weight.detach().numpy()
    expect = np.real(np.fft.ifft(np.fft.fft(w) * np.fft.fft(x.numpy(), axis=-1), axis=-1)) + \
        conv.bias.detach().numpy()
    np.testing.assert_allclose(conv(x).detach().numpy(), expect, atol=1e-12)
    np.testing.assert_allclose(conv.to_dense().detach().numpy(), scipy.linalg.circulant(w), atol=0)
    torch.testing.assert_close(conv(x), conv.reference_forward(x), rtol=0, atol=1e-12)
    assert conv.num_params() == 5 + 20
    assert conv.flops(batch=2) == 2 * (2 * T.dft(20).flops() + 6 * 20) + T.dft(20).flops() + 40
    # rectangular: zero-pad the input to n = max(in, out), keep the first out outputs
    rect = T.CircularConv1d(7, 12, bias=False, dtype=F64)
    xr = torch.randn(3, 7, dtype=F64)
    torch.testing.assert_close(rect(xr), xr @ rect.to_dense().T, rtol=0, atol=1e-12)
    torch.testing.assert_close(rect(xr), rect.reference_forward(xr), rtol=0, atol=1e-12)
    # float64 gradients through the FFT factors
    names = [k for k, _ in conv.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(conv, dict(zip(names, ps)), (x,))

    xs = torch.randn(2, 20, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (xs, *[p.detach().clone().requires_grad_(True)
                                              for p in conv.parameters()]))


def test_circular_conv_init_variance_like_linear():
    vals = []
    for layer_fn in (lambda: T.CircularConv1d(128, 128, kernel_size=9, dtype=F64),
                     lambda: deftly.make("dense", 128, 128, dtype=F64)):
        acc = 0.0
        for s in range(4):
            torch.manual_seed(s)
            layer = layer_fn()
            with torch.no_grad():
                acc += (layer(torch.randn(256, 128, dtype=F64)) - layer.bias).pow(2).mean().item()
        vals.append(acc / 4)
    assert abs(vals[0] / vals[1] - 1) <= 0.2, vals


# ------------------------------------------------------------------------------ derivatives
def test_spectral_derivative_of_sin3x():
    n = 64
    x = T.grid(n)
    D = T.derivative(n, "spectral")
    y = D(torch.sin(3 * x))
    assert y.dtype == F64
    assert (y - 3 * torch.cos(3 * x)).abs().max().item() <= 1e-10
    torch.testing.assert_close(D.to_dense() @ torch.sin(3 * x), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.reference_forward(torch.sin(3 * x)[None])[0], y, rtol=0, atol=1e-12)
    # Nyquist mode (-1)^j is zeroed for even n; odd n has none
    alt = torch.tensor([(-1.0) ** j for j in range(n)], dtype=F64)
    assert D(alt).abs().max().item() <= 1e-12
    D2 = T.derivative(n, "spectral", order=2)
    assert (D2(torch.sin(3 * x)) + 9 * torch.sin(3 * x)).abs().max().item() <= 1e-9
    odd = T.derivative(63, "spectral", length=3.0)
    xo = T.grid(63, 3.0)
    k = 2 * math.pi / 3.0
    assert (odd(torch.sin(2 * k * xo)) - 2 * k * torch.cos(2 * k * xo)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("method,order,want", [("fd2", 1, 2), ("fd4", 1, 4), ("fd2", 2, 2), ("fd4", 2, 4)])
def test_finite_difference_convergence_order(method, order, want):
    def f(x):
        return torch.exp(torch.sin(x))

    def df(x):
        return torch.cos(x) * f(x) if order == 1 else (torch.cos(x) ** 2 - torch.sin(x)) * f(x)

    errs = []
    for n in (32, 64, 128):  # halving h each time
        x = T.grid(n)
        errs.append((T.derivative(n, method, order=order)(f(x)) - df(x)).abs().max().item())
    rates = [math.log2(a / b) for a, b in itertools.pairwise(errs)]
    assert all(abs(r - want) < 0.15 for r in rates), (errs, rates)


def test_finite_difference_is_banded_plus_periodic_corners():
    n, h = 10, 2 * math.pi / 10
    D = T.derivative(n, "fd4")
    band = D.ops[0].layer
    assert band.name == "banded" and band.lower == band.upper == 2
    stencil = {-2: 1 / 12, -1: -2 / 3, 1: 2 / 3, 2: -1 / 12}
    want = np.zeros((n, n))
    for i in range(n):
        for off, v in stencil.items():
            want[i, (i + off) % n] += v / h
    np.testing.assert_allclose(D.to_dense().numpy(), want, atol=1e-13)
    x = torch.randn(3, n, dtype=F64)
    torch.testing.assert_close(D(x), x @ torch.tensor(want).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(D.reference_forward(x), D(x), rtol=0, atol=1e-12)
    # band entries plus the 2 * (1 + 2) = 6 wrap-around corners, then one add per output
    assert D.flops() == band.flops() + 2 * 6 + n


# ------------------------------------------------------------------------------ butterfly init agrees
@pytest.mark.parametrize("n", [8, 64])
def test_butterfly_inits_equal_the_operators(n):
    for init, op in (("fft", T.dft(n)), ("hadamard", T.hadamard(n)), ("dct", T.dct(n))):
        layer = deftly.make("butterfly", n, n, init=init, dtype=F64)
        np.testing.assert_allclose(layer.to_dense().detach().numpy(), op.to_dense().numpy(), atol=1e-12)


# ------------------------------------------------------------------------------ errors and imports
@pytest.mark.parametrize("call,pattern", [
    (lambda: T.dft(0), r"n=0"),
    (lambda: T.dft(8, norm="unitary"), r"norm='unitary'.*backward, ortho, forward"),
    (lambda: T.dft(8, prime="rader"), r"prime='rader'"),
    (lambda: T.dft(8, dtype=torch.bfloat16), r"bfloat16"),
    (lambda: T.hadamard(12), r"n=12 is not a power of two.*n=16"),
    (lambda: T.dct(8, dtype=torch.int64), r"dtype=torch.int64"),
    (lambda: T.derivative(16, "fd6"), r"method='fd6'.*spectral, fd2, fd4"),
    (lambda: T.derivative(4, "fd4"), r"n=4 is too small.*n >= 5"),
    (lambda: T.derivative(16, "fd2", order=3), r"order=3"),
    (lambda: T.derivative(16, length=-1.0), r"length=-1.0"),
    (lambda: T.circulant(torch.zeros(2, 2)), r"c must be a non-empty 1-D"),
    (lambda: T.CircularConv1d(8, 8, kernel_size=9), r"kernel_size=9"),
    (lambda: T.Compose([T.hadamard(8), torch.nn.Linear(8, 8, dtype=F64)]),
     r"LayerOperator: layer must be a deftly.StructuredLinear.*got Linear"),
    (lambda: T.hadamard(8)(torch.randn(2, 6, dtype=F64)), r"last dimension 6 but in_features=8"),
    (lambda: T.hadamard(8)(torch.randn(2, 8)), r"torch.float32 does not match the operator's torch.float64"),
    (lambda: T.dft(8).to("meta")(torch.randn(2, 8)), r"input is on device cpu but the operator is on meta"),
])
def test_errors_name_the_bad_value(call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()


def test_imports_stay_light():
    code = ("import sys, deftly, deftly.transforms, deftly.transforms.dual; "
            "bad = [m for m in ('scipy', 'matplotlib') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
