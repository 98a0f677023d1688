"""Numeric helpers of projection: float64 copies, parameter writes, covariance square roots, truncated
(whitened) low-rank factors and fixed-support least squares. Pure tensor functions used by every layer's
closed-form projection (``_project_closed_form``) and by :mod:`deftly.core.projection`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cov_sqrt", "fixed_support_operator", "fixed_support_solve", "low_rank_factors", "set_param_"]


def _hi(t: Tensor) -> Tensor:
    """float64 / complex128 copy."""
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


def set_param_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` in the parameter's dtype and device, without autograd."""
    with torch.no_grad():
        if value.is_complex() and not param.is_complex():
            value = value.real
        param.copy_(value.to(device=param.device, dtype=param.dtype).reshape(param.shape))


def cov_sqrt(cov: Tensor) -> Tensor:
    """A square root ``F`` of the PSD matrix ``cov`` (``(..., n, n)``): ``F F^T = cov``.

    ``F = Q diag(sqrt(max(lambda, 0)))`` from ``eigh``; batched.
    """
    lam, Q = torch.linalg.eigh(cov)
    return Q * lam.clamp_min(0).sqrt().unsqueeze(-2)


def _top_left_subspace(M: Tensor, k: int) -> Tensor:
    """Orthonormal basis ``(…, out, k)`` of the top-``k`` left singular subspace of ``M``, through the
    eigen-decomposition of the smaller Gram matrix (much faster than an SVD for repeated calls; float64
    keeps it exact to ~1e-8 relative of the subspace, ample for alternating projections)."""
    out_f, in_f = M.shape[-2:]
    if out_f <= in_f:
        _, Q = torch.linalg.eigh(M @ M.mT.conj())
        return Q[..., :, -k:].flip(-1)
    _, Q = torch.linalg.eigh(M.mT.conj() @ M)
    Ur, _ = torch.linalg.qr(M @ Q[..., :, -k:].flip(-1))
    return Ur


def low_rank_factors(W: Tensor, rank: int, cov: Tensor | None = None, *, root: Tensor | None = None,
                     fast: bool = False) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors ``U (…, out, rank)``, ``V (…, rank, in)`` of ``W (…, out, in)``.

    Without ``cov``: Eckart–Young (truncated SVD), ``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T``.
    With ``cov`` (``(…, in, in)``, broadcastable): the minimiser of ``||(W - U V) cov^{1/2}||_F`` —
    ``U_r`` the top left singular vectors of ``W cov^{1/2}`` and ``V = U_r^T W`` (no inverse of
    ``cov`` is needed, so a singular ``cov`` is fine). The columns are rescaled so that ``U[:, t]``
    and ``V[t]`` have equal norms. ``root``: a precomputed ``cov_sqrt(cov)`` (for repeated calls);
    ``fast``: find the subspace from the Gram matrix's eigenvectors instead of an SVD.
    A rank above ``min(out, in)`` is padded with zero factors (exact).
    """
    out_f, in_f = W.shape[-2:]
    k = min(rank, out_f, in_f)
    whitened = cov is not None or root is not None
    if not whitened and not fast:
        Us, S, Vh = torch.linalg.svd(W, full_matrices=False)
        s = S[..., :k].sqrt()
        U = Us[..., :, :k] * s.unsqueeze(-2)
        V = s.unsqueeze(-1) * Vh[..., :k, :]
    else:
        if root is None and cov is not None:
            root = cov_sqrt(cov)
        M = W @ root.to(W.dtype) if root is not None else W
        Ur = _top_left_subspace(M, k) if fast else torch.linalg.svd(M, full_matrices=False)[0][..., :, :k]
        V = Ur.mT.conj() @ W
        scale = V.abs().pow(2).sum(-1).sqrt().clamp_min(1e-300).sqrt()  # sqrt(||V_t||)
        U = Ur * scale.unsqueeze(-2)
        V = V / scale.unsqueeze(-1)
    if k < rank:
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], rank - k)], dim=-1)
        V = torch.cat([V, V.new_zeros(*V.shape[:-2], rank - k, in_f)], dim=-2)
    return U, V


def fixed_support_operator(cov: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """``(rest, P)`` for :func:`fixed_support_solve`: the input features outside ``support`` and
    ``P = cov_JJ^+ cov_{J,rest}`` (``(|J|, |rest|)``), so that the best row on ``support`` is
    ``s_J = w_J + w_rest P^T``. Precompute it once when projecting many weights on one ``cov``."""
    n = cov.shape[-1]
    mask = torch.ones(n, dtype=torch.bool, device=cov.device)
    mask[support] = False
    rest = mask.nonzero().squeeze(-1)
    if rest.numel() == 0:
        return rest, cov.new_zeros(len(support), 0)
    cJJ = cov[support][:, support]
    return rest, _psd_solve(cJJ, cov[support][:, rest])


def fixed_support_solve(W_rows: Tensor, cov: Tensor, support: Tensor,
                        operator: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rows of ``W`` restricted to the input features ``support``, best on the metric ``cov``.

    Minimises ``(w - s) cov (w - s)^T`` over rows ``s`` that are zero outside ``support``:
    ``s_J = w_J + cov_JJ^+ cov_{J,J^c} w_{J^c}``. Returns ``(rows, len(support))``. A row that is already
    zero outside ``support`` is returned unchanged (exact). ``operator``: from
    :func:`fixed_support_operator`.
    """
    rest, P = fixed_support_operator(cov, support) if operator is None else operator
    wJ = W_rows[:, support]
    if rest.numel() == 0:
        return wJ.clone()
    return wJ + W_rows[:, rest] @ P.mT.to(W_rows.dtype)


def _psd_solve(A: Tensor, B: Tensor) -> Tensor:
    """``A^+ B`` for a PSD ``A`` (eigen-decomposition; tiny eigenvalues dropped)."""
    lam, Q = torch.linalg.eigh(A)
    tol = lam.abs().max().clamp_min(1e-300) * A.shape[-1] * 1e-13
    inv = torch.where(lam > tol, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
    Qc = Q.to(B.dtype)
    return Qc @ (inv.to(B.dtype).unsqueeze(-1) * (Qc.mT @ B))
