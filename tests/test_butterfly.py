"""Butterfly-specific tests: each factor's sparsity pattern, exact FFT / Hadamard / DCT inits against
numpy and scipy, the kaleidoscope ``B^T B`` form, padding, and the fast multiply against the loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from torch.utils.flop_counter import FlopCounterMode

import deftly
from deftly.layers.butterfly import Butterfly, bit_reversal, butterfly_size

F64 = torch.float64


def make(in_f, out_f, **kw):
    return deftly.make("butterfly", in_f, out_f, dtype=F64, **kw)


def np_dense(layer):
    return layer.to_dense().detach().numpy()


@pytest.mark.parametrize("n", [2, 8, 32])
def test_each_factor_has_the_stride_pattern(n):
    torch.manual_seed(0)
    layer = make(n, n, depth=2, complex=True)
    k = int(math.log2(n))
    factors = layer.factors()
    assert len(factors) == 2 * k
    # applied order: strides 1, 2, ..., n/2, then n/2, ..., 1
    strides = [1 << j for j in range(k)] + [1 << j for j in reversed(range(k))]
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for M, s in zip(factors, strides):
        want = (r // (2 * s) == c // (2 * s)) & (r % s == c % s)  # 2x2 blocks at distance s
        got = M.detach().abs().numpy() > 0
        assert (got == want).all(), f"stride {s}"
        assert got.sum() == 2 * n  # n/2 blocks of 4 entries


def test_sizes_and_counts():
    assert [butterfly_size(i, o) for i, o in [(1, 1), (2, 2), (3, 2), (5, 17), (64, 64), (65, 3)]] == \
        [2, 2, 4, 32, 64, 128]
    for (i, o), depth, cplx in [((12, 20), 1, False), ((12, 20), 3, True), ((64, 64), 2, False)]:
        n = butterfly_size(i, o)
        layer = deftly.make("butterfly", i, o, bias=False, depth=depth, complex=cplx)
        k = n.bit_length() - 1
        assert layer.num_params() == sum(p.numel() for p in layer.parameters()) == 2 * n * k * depth
        # 4 multiply-adds per block, n/2 blocks, k factors, depth butterflies; complex: 4 real each
        assert layer.flops() == 2 * 4 * (n // 2) * k * depth * (4 if cplx else 1)
        if not cplx:  # the real multiply is one bmm per factor, which FlopCounterMode sees exactly
            with FlopCounterMode(display=False) as fc:
                layer(torch.randn(5, i))
            assert fc.get_total_flops() == layer.flops(batch=5)


def test_bit_reversal():
    assert bit_reversal(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    assert bit_reversal(1).tolist() == [0]
    r = bit_reversal(64)
    assert torch.equal(r[r], torch.arange(64))
    with pytest.raises(ValueError, match="n=12 is not a power of two"):
        bit_reversal(12)


# ------------------------------------------------------------------------------ exact inits
@pytest.mark.parametrize("n", [2, 4, 16, 128])
def test_fft_init_is_the_dft_matrix(n):
    layer = make(n, n, init="fft")
    assert layer.complex and layer.perm == "bitrev"
    F = np.fft.fft(np.eye(n), axis=0)
    assert np.abs(np_dense(layer) - F).max() <= 1e-12 * n
    x = torch.randn(5, n, dtype=torch.complex128)
    with torch.no_grad():
        y = (layer(x) - layer.bias).numpy()
    assert np.abs(y - np.fft.fft(x.numpy(), axis=-1)).max() <= 1e-12 * n
    ortho = make(n, n, init="fft", init_norm="ortho")
    assert np.abs(np_dense(ortho) - F / math.sqrt(n)).max() <= 1e-13 * n


@pytest.mark.parametrize("n", [2, 8, 64])
def test_hadamard_init_is_sylvester(n):
    layer = make(n, n, init="hadamard")
    assert not layer.complex and layer.to_dense().dtype == F64
    assert np.array_equal(np_dense(layer), scipy.linalg.hadamard(n))  # exact: +-1 products
    ortho = make(n, n, init="hadamard", init_norm="ortho")
    np.testing.assert_allclose(np_dense(ortho), scipy.linalg.hadamard(n) / math.sqrt(n), atol=1e-15)


@pytest.mark.parametrize("n", [2, 4, 16, 128])
def test_dct_init_is_orthonormal_dct2(n):
    layer = make(n, n, init="dct")
    assert layer.complex and layer.real_output and layer.perm == "dct"
    W = np_dense(layer)
    assert W.dtype == np.float64
    assert np.abs(W - scipy.fft.dct(np.eye(n), norm="ortho", axis=0)).max() <= 1e-13 * n
    x = torch.randn(7, n, dtype=F64)
    with torch.no_grad():
        y = (layer(x) - layer.bias).numpy()
    assert y.dtype == np.float64
    assert np.abs(y - scipy.fft.dct(x.numpy(), norm="ortho", axis=-1)).max() <= 1e-13 * n


def test_padded_fft_init_is_the_truncated_transform_of_the_padded_input():
    layer = make(12, 10, init="fft", bias=False)  # n = 16
    x = torch.randn(3, 12, dtype=torch.complex128)
    with torch.no_grad():
        y = layer(x).numpy()
    np.testing.assert_allclose(y, np.fft.fft(x.numpy(), n=16, axis=-1)[:, :10], atol=1e-12)


@pytest.mark.parametrize("init", ["fft", "hadamard", "dct", "identity"])
def test_deeper_butterflies_start_at_identity(init):
    one, three = make(16, 16, init=init), make(16, 16, init=init, depth=3)
    np.testing.assert_allclose(np_dense(three), np_dense(one), atol=1e-13)
    if init == "identity":
        np.testing.assert_array_equal(np_dense(one), np.eye(16))


# ------------------------------------------------------------------------------ kaleidoscope
def test_depth_two_is_kaleidoscope_BtB():
    """Butterfly 1 applies strides in decreasing order: with blockwise-transposed twiddles it is B^T."""
    torch.manual_seed(3)
    b = make(16, 16, bias=False)  # B, strides 1..8
    bb = make(16, 16, bias=False, depth=2)
    with torch.no_grad():
        bb.twiddle[0] = b.twiddle[0]
        bb.twiddle[1] = b.twiddle[0].transpose(-1, -2)
    B = np_dense(b)
    np.testing.assert_allclose(np_dense(bb), B.T @ B, atol=1e-12)
    x = torch.randn(4, 16, dtype=F64)
    with torch.no_grad():
        np.testing.assert_allclose(bb(x).numpy(), x.numpy() @ (B.T @ B).T, atol=1e-12)
    # a second-stage butterfly is not a first-stage one: a generic depth-1 butterfly is not symmetric
    assert np.abs(B - B.T).max() > 1e-3


# ------------------------------------------------------------------------------ fast vs reference
@pytest.mark.parametrize("in_f,out_f,kw", [
    (1, 1, {}), (3, 7, {"complex": True}), (17, 5, {"depth": 3}), (9, 9, {"perm": "bitrev"}),
    (20, 12, {"complex": True, "real_output": True, "perm": "dct"}), (8, 8, {"init": "dct"}),
    (33, 64, {"init": "fft", "depth": 2}), (16, 16, {"init": "hadamard", "perm": "bitrev"}),
])
def test_fast_equals_reference_and_dense(in_f, out_f, kw):
    torch.manual_seed(1)
    layer = make(in_f, out_f, **kw)
    if kw.get("init") in ("fft", "dct", "hadamard"):  # move off the exact init so every entry matters
        with torch.no_grad():
            layer.twiddle.add_(0.1 * torch.randn_like(layer.twiddle))
    x = torch.randn(2, 3, in_f, dtype=F64)
    y = layer(x)
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-12, atol=1e-12)
    dense = layer.to_dense()
    torch.testing.assert_close(y, x.to(dense.dtype) @ dense.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_dct_form():
    layer = make(8, 8, init="dct", bias=False)
    x = torch.randn(3, 8, dtype=F64)

    def f(tw):
        return torch.func.functional_call(layer, {"twiddle": tw}, (x,))

    assert torch.autograd.gradcheck(f, (layer.twiddle.detach().clone().requires_grad_(True),))


def test_real_output_init_variance_and_dtypes():
    layer = deftly.make("butterfly", 64, 64, complex=True, real_output=True, dtype=torch.float32)
    assert layer.twiddle.dtype == torch.complex64 and layer.bias.dtype == torch.float32
    y = layer(torch.randn(4, 64))
    assert y.dtype == torch.float32


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,pattern", [
    ({"init": "fft", "complex": False}, r"init='fft' needs complex.*complex=True"),
    ({"init": "fourier"}, r"init='fourier'.*random, identity, fft, hadamard, dct"),
    ({"depth": 0}, r"depth=0.*depth=1"),
    ({"perm": "random"}, r"perm='random'.*none, bitrev, dct"),
    ({"init": "fft", "perm": "none"}, r"needs perm='bitrev'"),
    ({"init": "dct", "real_output": False}, r"real_output=False"),
    ({"init": "dct", "init_norm": "backward"}, r"init_norm='backward'"),
    ({"init_norm": "ortho"}, r"init_norm='ortho' only applies"),
    ({"dtype": torch.complex64, "complex": False}, r"complex=False"),
    ({"dtype": torch.bfloat16, "complex": True}, r"dtype=torch.bfloat16.*float32"),
    ({"dtype": torch.bfloat16, "init": "fft"}, r"dtype=torch.bfloat16"),
])
def test_errors_name_value_and_fix(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        deftly.make("butterfly", 16, 16, **kw)


def test_complex_dtype_implies_complex():
    layer = deftly.make("butterfly", 8, 8, dtype=torch.complex128)
    assert layer.complex and layer.twiddle.dtype == torch.complex128 and layer.bias.dtype == torch.complex128
    assert isinstance(layer, Butterfly)
