"""Projection of a dense weight onto a structure: the best structured approximation, and its error.

``deftly.project(weight, "monarch", nblocks=4)`` builds a layer whose ``to_dense()`` is the closest
structured matrix to ``weight`` (``(out, in)``, as in ``nn.Linear``), carries the bias over and returns
``(layer, relative_error)``. Every layer also has :meth:`deftly.StructuredLinear.project_` to do the same
in place. Each structure keeps its own closed form next to its multiply (``_project_closed_form`` in its
module: truncated SVD for ``lowrank``, block extraction for ``blockdiag``, rank-r SVD of every
(output-block, input-block) slice for ``monarch``, alternating projection for ``lrbd``...); a structure
without one is fitted by a deterministic L-BFGS on the same objective (:func:`fit_`).

**Activation-aware projection.** With calibration inputs ``X: (n, in)`` the objective becomes the error
on those inputs, ``||(W - S) X^T||_F``, i.e. ``||(W - S) C^{1/2}||_F`` with the input second moment
``C = X^T X / n`` (:class:`Calibration`). Exact closed forms where the whitened problem stays in the
structure (low-rank: the top left singular vectors of ``W C^{1/2}``, ``S = U_r U_r^T W``; block-diagonal
and other fixed-support patterns: a least-squares solve per block); otherwise the plain and any
approximate whitened closed forms are refined by L-BFGS on the activation objective. The result is
never worse (on the calibration objective) than the plain projection.

All projection arithmetic runs in float64 (complex128 for complex layers) and is written back in the
layer's dtype.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .linalg import _hi, set_param_

if TYPE_CHECKING:
    from .base import StructuredLinear

__all__ = [
    "Calibration",
    "ProjectionResult",
    "fit_",
    "project_layer_",
    "relative_error",
]


# ---------------------------------------------------------------------------------------------- calibration
class Calibration:
    """The input second moment ``C = X^T X / n`` of a layer, accumulated in float64.

    Build it from inputs (``Calibration(X)`` with ``X: (*, in)``), or accumulate batch by batch with
    :meth:`add` (what :func:`deftly.structurize` does through forward hooks). The activation-aware
    objective ``||(W - S) X^T||_F^2 / n = ||(W - S) C^{1/2}||_F^2`` only needs ``C``.
    """

    def __init__(self, inputs: Tensor | None = None, *, in_features: int | None = None,
                 name: str | None = None) -> None:
        self.in_features = in_features
        self.name = name  # the layer these inputs feed, named in errors
        self.sum: Tensor | None = None
        self.count = 0
        self.batches = 0  # calls of add(), including ones with 0 rows
        self._root: tuple[int, Tensor] | None = None
        if inputs is not None:
            self.add(inputs)

    def _where(self) -> str:
        return f"calibration inputs of layer {self.name!r}" if self.name else "calibration inputs"

    @classmethod
    def from_covariance(cls, cov: Tensor, count: int = 1) -> Calibration:
        """From a precomputed ``(in, in)`` second moment ``C = X^T X / n``."""
        if not isinstance(cov, Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"Calibration.from_covariance: cov must be a square (in, in) tensor, got "
                             f"{getattr(cov, 'shape', type(cov).__name__)}")
        if (cov.is_floating_point() or cov.is_complex()) and not bool(torch.isfinite(cov).all()):
            raise ValueError(f"Calibration.from_covariance: cov has {int((~torch.isfinite(cov)).sum())} "
                             f"non-finite entries; recompute it from finite inputs")
        cal = cls(in_features=cov.shape[0])
        cal.sum = _hi(cov) * count
        cal.count = int(count)
        return cal

    def add(self, inputs: Tensor) -> None:
        """Accumulate ``inputs: (*, in_features)``. Refuses non-finite values (NaN/inf would make every
        projection of this layer NaN, or its eigendecomposition fail): the error names the layer and counts
        them."""
        where = self._where()
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{where} must be a torch.Tensor of shape (n_samples, in_features), got "
                            f"{type(inputs).__name__}")
        if inputs.dim() == 0:
            raise ValueError(f"{where} must have shape (n_samples, in_features); got a 0-d tensor")
        if self.in_features is not None and inputs.shape[-1] != self.in_features:
            raise ValueError(f"{where} have last dimension {inputs.shape[-1]} but the layer has "
                             f"in_features={self.in_features}; pass inputs of shape (n_samples, "
                             f"{self.in_features})")
        self.in_features = inputs.shape[-1]
        self.batches += 1
        X = inputs.detach().reshape(-1, inputs.shape[-1])
        if X.is_floating_point() or X.is_complex():
            finite = torch.isfinite(X)
            if not bool(finite.all()):
                nan = int(torch.isnan(X).sum())
                inf = int((~finite).sum()) - nan
                raise ValueError(f"{where} contain {nan + inf} non-finite value(s) ({nan} NaN, {inf} inf) among "
                                 f"{X.numel()} in a batch of {X.shape[0]} row(s); clean the calibration data, or "
                                 f"find where the model upstream of this layer overflows (e.g. run it in "
                                 f"float32), before projecting")
        X = _hi(X)
        if X.is_complex():
            X = X.real  # deftly projects real weights; a complex layer still sees these real inputs
        part = X.mT @ X
        if X.numel() and not bool(torch.isfinite(part).all()):
            raise ValueError(f"{where}: the second moment X^T X overflows float64 (largest |x| = "
                             f"{float(X.abs().max()):.3g}); rescale the calibration data")
        self.sum = part if self.sum is None else self.sum + part.to(self.sum.device)
        self.count += X.shape[0]

    @property
    def cov(self) -> Tensor:
        if self.sum is None or self.count == 0:
            if self.batches:
                raise ValueError(f"{self._where()} are empty (no samples): {self.batches} batch(es) with 0 rows "
                                 f"were added; pass at least one sample of shape (n_samples, {self.in_features})")
            raise ValueError(f"{self._where()}: no samples yet; add inputs of shape (n_samples, in_features)")
        return self.sum / self.count

    def root(self) -> Tensor:
        """``R: (m, in)`` with ``R^T R = C`` (the scaled eigenvectors; null directions dropped).
        Cached until more inputs are added."""
        if self._root is None or self._root[0] != self.count:
            lam, Q = torch.linalg.eigh(self.cov)
            keep = lam > lam.max().clamp_min(1e-300) * 1e-13
            self._root = (self.count, (Q[:, keep] * lam[keep].sqrt()).mT.contiguous())
        return self._root[1]

    def __repr__(self) -> str:
        named = f"name={self.name!r}, " if self.name else ""
        return f"Calibration({named}in_features={self.in_features}, samples={self.count})"


def _as_calibration(calibration: Any, in_features: int) -> Calibration | None:
    if calibration is None:
        return None
    if isinstance(calibration, Calibration):
        if calibration.in_features != in_features:
            raise ValueError(f"calibration has in_features={calibration.in_features} but the layer has "
                             f"in_features={in_features}")
        return calibration
    if isinstance(calibration, Tensor):
        return Calibration(calibration, in_features=in_features)
    raise TypeError(f"calibration must be a Tensor of inputs (n_samples, {in_features}) or a "
                    f"deftly.core.projection.Calibration, got {type(calibration).__name__}")


def relative_error(W: Tensor, S: Tensor, cov: Tensor | None = None) -> float:
    """``||W - S||_F / ||W||_F``, or with ``cov`` ``||(W - S) C^{1/2}|| / ||W C^{1/2}||`` (the relative
    output error on the calibration inputs). If the denominator is 0, the numerator is returned."""
    W, S = _hi(W), _hi(S).to(W.device)
    E = W - S
    if cov is None:
        num, den = _fro2(E), _fro2(W)
    else:
        cov = cov.to(W.device)
        num, den = _quad(E, cov), _quad(W, cov)
    num, den = math.sqrt(max(num, 0.0)), math.sqrt(max(den, 0.0))
    return num / den if den > 0 else num


def _fro2(E: Tensor) -> float:
    return float(E.abs().pow(2).sum())


def _quad(E: Tensor, cov: Tensor) -> float:
    """``tr(E C E^H)``."""
    return float(((E @ cov.to(E.dtype)) * E.conj()).sum().real)


# ---------------------------------------------------------------------------------------------- fitting
def _real_views(work: StructuredLinear) -> tuple[list[str], list[Tensor], list[bool]]:
    names, leaves, cplx = [], [], []
    for name, p in work.named_parameters():
        if name == "bias":
            continue
        names.append(name)
        cplx.append(p.is_complex())
        leaves.append((torch.view_as_real(p.detach()) if p.is_complex() else p.detach()).clone()
                      .requires_grad_(True))
    return names, leaves, cplx


#: squared relative error at which fitting stops (relative error 1e-8, below float32 resolution)
_DONE = 1e-16


def fit_(layer: StructuredLinear, weight: Tensor, calibration: Calibration | None = None, *,
         steps: int = 300, from_current: bool = True, seed: int = 0, stall: float = 1e-4) -> float:
    """Fit the layer's structured weight to ``weight`` by full-batch L-BFGS (float64, deterministic).

    Minimises ``||layer(R) - R W^T||_F^2`` with ``R = I`` (plain) or ``R = C^{1/2}`` from the
    calibration (activation-aware), i.e. ``||(W - S) R^T||``. Starts from the current parameters, or
    (``from_current=False``) from the structure's own init under ``torch.manual_seed(seed)`` (the global
    RNG state is restored). Runs L-BFGS in chunks of 25 iterations and stops after ``steps``, once the
    relative error is below 1e-8, or when a chunk lowers the objective by less than the fraction
    ``stall``. Keeps the best iterate; never makes the objective worse than the start.
    Returns the final relative error. The bias is not touched.
    """
    W = _hi(weight).to(_device(layer))
    work = copy.deepcopy(layer)
    with torch.no_grad():
        for p in work.parameters():
            p.data = p.data.to(torch.complex128 if p.is_complex() else torch.float64)
        for _name, b in work.named_buffers():
            if b.is_floating_point() or b.is_complex():
                b.data = b.data.to(torch.complex128 if b.is_complex() else torch.float64)
    if not from_current:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            work.reset_parameters()
    R = (torch.eye(layer.in_features, dtype=torch.float64, device=W.device) if calibration is None
         else calibration.root().to(W.device))
    target = R @ W.mT  # (m, out)
    den = max(_fro2(target), 1e-300)
    names, leaves, cplx = _real_views(work)
    if not leaves:
        return relative_error(W, work.to_dense(), None if calibration is None else calibration.cov)

    def params() -> dict[str, Tensor]:
        return {n: (torch.view_as_complex(v) if c else v) for n, v, c in zip(names, leaves, cplx)}

    def loss_fn() -> Tensor:
        y = torch.func.functional_call(work, params(), (R,), strict=False)
        if work.bias is not None:
            y = y - work.bias.detach()
        return (y - target).abs().pow(2).sum() / den

    with torch.no_grad():
        best = float(loss_fn())
    best_state = [v.detach().clone() for v in leaves]
    if math.isfinite(best) and best > _DONE:
        chunk = min(steps, 25)
        opt = torch.optim.LBFGS(leaves, lr=1.0, max_iter=chunk, max_eval=int(chunk * 1.5) + 1,
                                history_size=10, tolerance_grad=1e-14, tolerance_change=1e-18,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = loss_fn()
            value.backward()
            return value

        done = 0
        while done < steps:
            try:
                opt.step(closure)
            except RuntimeError:  # pragma: no cover - a failed line search keeps the best iterate
                break
            done += chunk
            with torch.no_grad():
                now = float(loss_fn())
            if not math.isfinite(now):
                break
            stalled = now > best * (1 - stall)
            if now < best:
                best, best_state = now, [v.detach().clone() for v in leaves]
            if best <= _DONE or stalled:
                break
    by_name = dict(layer.named_parameters())
    for n, v, c in zip(names, best_state, cplx):
        set_param_(by_name[n], torch.view_as_complex(v) if c else v)
    return math.sqrt(max(best, 0.0))


def _device(layer: StructuredLinear) -> torch.device:
    for t in list(layer.parameters()) + list(layer.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class ProjectionResult:
    """What a projection did and how well it did it.

    ``error`` is the relative error of the objective minimised: ``weight_error`` without calibration,
    ``output_error`` with it. ``plain_output_error`` is the output error the plain (calibration-free)
    projection would have had — the baseline the activation-aware projection is compared with.
    """

    error: float
    weight_error: float
    output_error: float | None = None
    plain_output_error: float | None = None
    method: str = ""
    seconds: float = 0.0


def _snapshot(layer: StructuredLinear) -> list[Tensor]:
    return [p.detach().clone() for n, p in layer.named_parameters() if n != "bias"]


def _restore(layer: StructuredLinear, state: list[Tensor]) -> None:
    for (_n, p), v in zip([(n, p) for n, p in layer.named_parameters() if n != "bias"], state):
        set_param_(p, v)


def _check_weight(layer: StructuredLinear, weight: Any) -> None:
    owner = type(layer).__name__
    if not isinstance(weight, Tensor):
        raise TypeError(f"{owner}.project_: weight must be a torch.Tensor of shape (out_features, "
                        f"in_features) = ({layer.out_features}, {layer.in_features}), got {type(weight).__name__}")
    want = (layer.out_features, layer.in_features)
    if tuple(weight.shape) != want:
        hint = ""
        if tuple(weight.shape) == want[::-1]:
            hint = " (it looks transposed: a Hugging Face Conv1D stores (in, out); pass weight.T)"
        raise ValueError(f"{owner}.project_: weight has shape {tuple(weight.shape)} but the layer needs "
                         f"(out_features, in_features) = {want}{hint}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"{owner}.project_: weight dtype {weight.dtype} is not floating point")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{owner}.project_: weight has non-finite entries (nan/inf); clean it first")


def _set_bias(layer: StructuredLinear, bias: Tensor | None) -> None:
    owner = type(layer).__name__
    if bias is None:
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.zero_()
        return
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (layer.out_features,):
        raise ValueError(f"{owner}.project_: bias must be a tensor of shape ({layer.out_features},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    if layer.bias is None:
        raise ValueError(f"{owner}.project_: a bias was given but the layer has none; build it with "
                         f"bias=True or pass bias=None")
    set_param_(layer.bias, bias.detach())


def _closed_form(layer: StructuredLinear, W: Tensor, cov: Tensor | None) -> bool | None:
    """Run the structure's closed form; ``None`` when it has none."""
    try:
        return bool(layer._project_closed_form(W, cov))
    except NotImplementedError:
        return None


def _zero_is_better(layer: StructuredLinear, W: Tensor, cov: Tensor | None, current: float) -> bool:
    """Try the all-zero parameters (the trivial baseline); keep them if they beat ``current``."""
    state = _snapshot(layer)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n != "bias":
                p.zero_()
        err = relative_error(W, layer.to_dense(), cov)
    if err < current:
        return True
    _restore(layer, state)
    return False


def project_layer_(layer: StructuredLinear, weight: Tensor, bias: Tensor | None = None, *,
                   calibration: Any = None, method: str = "auto", steps: int | None = None,
                   seed: int = 0, refine: bool = True) -> ProjectionResult:
    """Set ``layer`` to the best structured approximation of ``weight`` (see
    :meth:`StructuredLinear.project_`) and report how it went. ``refine=False`` skips the L-BFGS polish
    of closed forms that are only starting points (for quick comparisons of candidates)."""
    t0 = time.perf_counter()
    _check_weight(layer, weight)
    if method not in ("auto", "closed", "fit"):
        raise ValueError(f"project: method={method!r} is invalid; use 'auto' (closed form when the structure "
                         f"has one, else fitting), 'closed' or 'fit'")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"project: steps={steps!r} must be a non-negative int (L-BFGS iterations) or None")
    cal = _as_calibration(calibration, layer.in_features)
    cov = None if cal is None else cal.cov.to(_device(layer))
    W = _hi(weight).to(_device(layer))
    _set_bias(layer, bias)
    refine = refine and steps != 0
    used: list[str] = []
    plain_out = None

    done = None
    if method in ("closed", "auto"):
        done = _closed_form(layer, W, None)
        if done is None and method == "closed":
            raise NotImplementedError(f"structure {layer.name!r} has no closed-form projection; use "
                                      f"method='auto' or 'fit'")
    has_closed = done is not None
    if not has_closed:  # no closed form (or method="fit"): deterministic fit from the structure's init
        fit_(layer, W, None, steps=steps or 500, from_current=False, seed=seed)
        used.append("fit")
    else:
        used.append("closed-form")
        if done is False and refine:  # the closed form is a starting point: polish it
            before = relative_error(W, layer.to_dense())
            state = _snapshot(layer)
            if fit_(layer, W, None, steps=steps or 50, from_current=True) < before:
                used.append("refined")
            else:
                _restore(layer, state)
    if cov is not None:
        plain_out = relative_error(W, layer.to_dense(), cov)
        best_err, best_state = plain_out, _snapshot(layer)
        optimal = False
        if has_closed:
            whitened = _closed_form(layer, W, cov)
            err = relative_error(W, layer.to_dense(), cov)
            if err <= best_err:
                best_err, best_state, optimal = err, _snapshot(layer), bool(whitened)
                used.append("whitened")
        _restore(layer, best_state)
        if not optimal and refine:  # gradient steps on the activation objective
            err = fit_(layer, W, cal, steps=steps or 30, from_current=True)
            if err < best_err:
                best_err = err
                used.append("activation-refined")
            else:
                _restore(layer, best_state)
    obj = relative_error(W, layer.to_dense(), cov)
    if obj > 0 and _zero_is_better(layer, W, cov, obj):
        used.append("zero")
    S = layer.to_dense()
    werr = relative_error(W, S)
    oerr = None if cov is None else relative_error(W, S, cov)
    return ProjectionResult(error=werr if oerr is None else oerr, weight_error=werr, output_error=oerr,
                            plain_output_error=plain_out, method="+".join(used),
                            seconds=time.perf_counter() - t0)
