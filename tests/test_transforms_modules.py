"""Every transform of ``deftly.transforms`` behaves as a module: ``.to(dtype)`` / ``.double()`` / ``.float()``
recompute its constants in the new precision (a low-precision build cast up equals the float64 build bit
for bit), ``state_dict`` round trips into a fresh instance, ``copy.deepcopy``, ``.to("meta")`` +
``.to_empty()``, ``.cuda()``; and the casts that have no meaning are refused with a clear error."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import deftly
import deftly.transforms as T

pytestmark = pytest.mark.filterwarnings("ignore:Complex modules are a new feature")

F32, F64 = torch.float32, torch.float64


def _vec(n, *, complex_=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=F64)
    return torch.complex(v, torch.randn(n, generator=g, dtype=F64)) if complex_ else v


def _cx(p):
    return p.to_complex()


# name exported by deftly.transforms -> [(label, build(precision) -> operator, learnable)]. ``precision`` is
# float32 or float64; complex operators use its complex counterpart. Learnable ones draw random weights,
# so their float64 reference is their own dense matrix, not a second build.
CASES = {
    "dft": [("pow2", lambda p: T.dft(64, dtype=_cx(p)), False),
            ("mixed", lambda p: T.dft(30, norm="ortho", dtype=_cx(p)), False),
            ("prime", lambda p: T.dft(13, dtype=_cx(p)), False)],
    "idft": [("mixed", lambda p: T.idft(12, dtype=_cx(p)), False)],
    "DFT": [("inverse_forward", lambda p: T.DFT(20, inverse=True, norm="forward", dtype=_cx(p)), False)],
    "bluestein": [("n11", lambda p: T.bluestein(11, -1, _cx(p)), False)],
    "Bluestein": [("n5_inverse", lambda p: T.Bluestein(5, 1, _cx(p)), False)],
    "hadamard": [("ortho", lambda p: T.hadamard(16, norm="ortho", dtype=p), False)],
    "Hadamard": [("plain", lambda p: T.Hadamard(8, dtype=p), False)],
    "dct": [("ortho", lambda p: T.dct(12, dtype=p), False)],
    "DCT": [("backward", lambda p: T.DCT(7, norm="backward", dtype=p), False)],
    "circulant": [("real", lambda p: T.circulant(_vec(10), dtype=p), False),
                  ("complex", lambda p: T.circulant(_vec(8, complex_=True), dtype=_cx(p)), False)],
    "Circulant": [("real", lambda p: T.Circulant(_vec(6, seed=1), dtype=p), False)],
    "toeplitz": [("rect", lambda p: T.toeplitz(_vec(5), _vec(7, seed=2), dtype=p), False)],
    "Toeplitz": [("hermitian", lambda p: T.Toeplitz(_vec(6, complex_=True), dtype=_cx(p)), False)],
    "derivative": [("spectral", lambda p: T.derivative(16, dtype=p), False),
                   ("fd2", lambda p: T.derivative(12, "fd2", length=3.0, dtype=p), False),
                   ("fd4_order2", lambda p: T.derivative(12, "fd4", order=2, dtype=p), False)],
    "Derivative": [("spectral", lambda p: T.Derivative.spectral(10, 2 * math.pi, 2, p), False),
                   ("fd4", lambda p: T.Derivative.finite_difference(10, "fd4", 1.0, 1, p), False)],
    "CircularConv1d": [("rect", lambda p: T.CircularConv1d(12, 10, kernel_size=5, dtype=p), True)],
    "Compose": [("gather_diag", lambda p: T.Compose([T.Gather.permutation(torch.arange(6).flip(0), _cx(p)),
                                                     T.Diagonal(_vec(6, complex_=True), _cx(p))]), False)],
    "DenseMatrix": [("complex", lambda p: T.DenseMatrix(torch.randn(4, 6, generator=torch.Generator()
                                                                    .manual_seed(3), dtype=torch.complex128),
                                                        _cx(p)), False)],
    "Diagonal": [("real", lambda p: T.Diagonal(_vec(7), p), False),
                 ("real_in_complex", lambda p: T.Diagonal(_vec(7), _cx(p)), False)],
    "Gather": [("pad", lambda p: T.Gather(torch.tensor([2, 0, 5, 1, 5]), 5, p), False)],
    "KronIdentity": [("dense_x3", lambda p: T.KronIdentity(T.DenseMatrix(_vec(6).reshape(2, 3), p), 3), False)],
    "LayerOperator": [("monarch", lambda p: T.LayerOperator(deftly.make("monarch", 16, 16, bias=False,
                                                                        nblocks=4, dtype=p)), True)],
    "Radix2": [("fft", lambda p: T.Radix2(16, -1, bitrev=True, dtype=_cx(p)), False),
               ("walsh", lambda p: T.Radix2(8, None, bitrev=False, dtype=p), False)],
    "RealPart": [("diag", lambda p: T.RealPart(6, _cx(p), _vec(6, complex_=True)), False)],
    "Scale": [("third", lambda p: T.Scale(5, 1 / 3, p), False)],
    "SparseMatrix": [("corners", lambda p: T.SparseMatrix([0, 4, 2], [5, 0, 2], [1 / 3, -2.5, 0.1], (5, 6), p),
                      False)],
    "Sum": [("diag_dense", lambda p: T.Sum([T.Diagonal(_vec(4), p),
                                            T.DenseMatrix(_vec(16, seed=5).reshape(4, 4), p)]), False)],
    "ToComplex": [("plain", lambda p: T.ToComplex(5, p), False)],
}
#: exported names that are not operators
NOT_OPERATORS = {"Operator": "the abstract base", "grid": "returns the sample points, a tensor"}

PARAMS = [pytest.param(build, learnable, id=f"{name}-{label}")
          for name, cases in CASES.items() for label, build, learnable in cases]


def _build(build, precision, seed=0):
    torch.manual_seed(seed)
    return build(precision)


def _input(op, precision, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, op.in_features, generator=g, dtype=F64)
    if op.weight_dtype.is_complex:
        x = torch.complex(x, torch.randn(3, op.in_features, generator=g, dtype=F64))
    return x.to(op.weight_dtype if op.weight_dtype.is_complex else precision)


def _wide_dtype(op):
    return torch.complex128 if op.weight_dtype.is_complex else F64


def test_every_export_is_covered():
    missing = sorted(set(T.__all__) - set(CASES) - set(NOT_OPERATORS))
    assert not missing, f"add cases for {missing}"
    assert not set(CASES) - set(T.__all__)


@pytest.mark.parametrize("build, learnable", PARAMS)
@pytest.mark.parametrize("cast", ["to", "double"])
def test_cast_up_equals_the_float64_reference(build, learnable, cast):
    lo = _build(build, F32)
    before = lo.weight_dtype
    assert before in (F32, torch.complex64)
    up = lo.to(_wide_dtype(lo)) if cast == "to" else lo.double()
    assert up is lo and lo.weight_dtype == _wide_dtype(lo)
    for m in lo.modules():  # every factor and every tensor follows
        if isinstance(m, T.Operator):
            assert m.in_dtype in (F64, torch.complex128) and m.out_dtype in (F64, torch.complex128), m
    assert all(t.dtype in (F64, torch.complex128) for t in lo.buffers() if t.is_floating_point() or t.is_complex())
    x = _input(lo, F64)
    if learnable:  # same weights, float64 internals: agrees with its dense matrix to float64 rounding
        want = x @ lo.to_dense().T.to(torch.promote_types(x.dtype, lo.to_dense().dtype))
        if lo.bias is not None:
            want = want + lo.bias
        got = lo(x)
        assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    else:
        ref = _build(build, F64)
        assert torch.equal(lo(x), ref(x))
        assert torch.equal(lo.to_dense(), ref.to_dense())


@pytest.mark.parametrize("build, learnable", [p for p in PARAMS if not p.values[1]])
def test_cast_down_is_the_low_precision_build(build, learnable):
    hi = _build(build, F64)
    low_dtype = torch.complex64 if hi.weight_dtype.is_complex else F32
    lo = hi.to(low_dtype)
    ref = _build(build, F32)
    x = _input(ref, F32)
    assert lo.weight_dtype == ref.weight_dtype
    assert torch.equal(lo(x), ref(x))  # rounded once, from the exact constants
    assert torch.equal(lo.to(_wide_dtype(lo))(x.to(_wide_dtype(lo))), _build(build, F64)(x.to(_wide_dtype(lo))))


@pytest.mark.parametrize("build, learnable", PARAMS)
def test_state_dict_deepcopy_and_meta(build, learnable):
    op = _build(build, F64)
    x = _input(op, F64)
    y = op(x)
    fresh = _build(build, F64, seed=1)  # learnable ones start from other weights
    result = fresh.load_state_dict(op.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh(x), y)
    twin = copy.deepcopy(op)
    assert torch.equal(twin(x), y)
    twin.float()  # a cast of the copy leaves the original alone
    assert op.weight_dtype == _wide_dtype(op) and torch.equal(op(x), y)
    if not learnable:  # constants are remembered: an emptied operator comes back whole
        ghost = copy.deepcopy(op).to("meta")
        assert all(t.is_meta for t in ghost.buffers())
        ghost.to_empty(device="cpu")
        assert torch.equal(ghost(x), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("build, learnable", PARAMS)
def test_cuda_round_trip(build, learnable):
    op = _build(build, F64)
    x = _input(op, F64)
    y = op(x)
    dev = op.cuda()
    assert all(t.device.type == "cuda" for t in dev.buffers())
    torch.testing.assert_close(dev(x.cuda()).cpu(), y, rtol=1e-12, atol=1e-12)
    back = dev.to(torch.device("cpu"))
    assert torch.equal(back(x), y)


def test_complex_transform_cast_to_complex64_stays_exact():
    F = T.dft(210)
    x = _input(F, F64)
    F.to(torch.complex64)
    ref = T.dft(210, dtype=torch.complex64)
    for a, b in zip(F.buffers(), ref.buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(F(x.to(torch.complex64)), ref(x.to(torch.complex64)))
    # the report: a module-level cast of a transform raised AttributeError
    G = T.dft(64).to(torch.complex64)
    assert G.weight_dtype == torch.complex64 and G.to_dense().dtype == torch.complex64


def test_real_dtype_on_a_complex_operator_names_its_precision():
    # the builders' convention: dtype=torch.float32 for a DFT means complex64; casts follow it
    F = T.dft(12).to(torch.float32)
    assert F.weight_dtype == torch.complex64
    ref = T.dft(12, dtype=torch.float32)
    x = _input(ref, F32)
    assert torch.equal(F(x), ref(x))
    assert T.dft(12, dtype=torch.complex64).double().weight_dtype == torch.complex128
    assert T.dft(12).float().weight_dtype == torch.complex64


def test_refused_casts_name_the_fix_and_change_nothing():
    D = T.dct(8)
    x = _input(D, F64)
    y = D(x)
    with pytest.raises(TypeError, match=r"DCT: cannot cast a real operator \(torch.float64 inputs\) to "
                                        r"torch.complex64.*\.to\(torch.float32\)"):
        D.to(torch.complex64)
    with pytest.raises(TypeError, match=r"cannot cast to torch.bfloat16: the operator has complex factors"):
        D.bfloat16()
    with pytest.raises(TypeError, match=r"torch.float16"):
        T.dft(8).half()
    assert D.weight_dtype == F64 and torch.equal(D(x), y)
    with pytest.raises(TypeError, match="real operator"):
        T.hadamard(8).to(torch.complex128)


def test_real_only_operators_go_to_half_precision():
    H = T.hadamard(16).bfloat16()
    ref = T.hadamard(16, dtype=torch.bfloat16)
    x = _input(ref, torch.bfloat16)
    assert H.weight_dtype == torch.bfloat16 and torch.equal(H(x), ref(x))
    assert T.Gather.pad(4, 6, F64).half().weight_dtype == torch.float16


def test_casts_inside_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(T.CircularConv1d(16, 16, dtype=F32), nn.Linear(16, 16, dtype=F32), T.dct(16, dtype=F32))
    x = torch.randn(4, 16, dtype=F64)
    model.double()
    conv = model[0]
    assert conv.fft.weight_dtype == torch.complex128 and model[2].weight_dtype == F64
    want = x @ conv.to_dense().T + conv.bias
    assert (conv(x) - want).abs().max() < 1e-12
    ref = T.dct(16)(model[1](conv(x)))
    assert torch.equal(model(x), ref)
    model.to(torch.float32)
    assert conv.fft.weight_dtype == torch.complex64 and model[2].weight_dtype == F32


def test_in_place_changes_are_cast_from_their_current_value():
    torch.manual_seed(0)
    op = T.LayerOperator(deftly.make("lowrank", 6, 6, bias=False, rank=2, dtype=F32))
    with torch.no_grad():
        op.layer.U.mul_(3.0)  # trained since it was wrapped: the remembered value is stale
    u, v = op.layer.U.detach().clone(), op.layer.V.detach().clone()
    op.double()
    assert torch.equal(op.layer.U, u.double()) and torch.equal(op.layer.V, v.double())
