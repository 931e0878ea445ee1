"""Linear solves by matrix-vector products only (no matrix is ever formed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """(x, r): x ≈ A⁻¹b for symmetric positive-definite A given only v ↦ Av (Nocedal & Wright
    2006, Alg. 5.2), from x₀ = 0, and its residual r = b − Ax (kept by the recursion, so Ax = b − r
    costs no further product); stops early once ‖r‖² ≤ ``residual_tol``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr <= residual_tol:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x, r


def guarded_conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                               residual_tol: float = 1e-10) -> Tensor:
    """x ≈ A⁻¹b by CG for an A that is meant to be positive definite but may not be (iMAML's
    I + H/λ where the inner problem is not at a local minimum). Stops at the first direction p
    of non-positive curvature pᵀAp ≤ 0 (the truncation of Steihaug 1983), where CG's step
    rr/pᵀAp would be infinite or point uphill, and keeps the iterate reached; if b itself has
    non-positive curvature it returns b (A taken as I). On positive-definite A this is
    :func:`conjugate_gradient`. Branch-free, so it runs per task under ``torch.func.vmap``."""
    x = torch.zeros_like(b)
    r, p = b, b
    rr = r @ r
    active = rr > residual_tol
    fallback = torch.zeros_like(active)
    for k in range(iters):
        ap = matvec(p)
        pap = p @ ap
        curved = pap > 0
        if k == 0:
            fallback = active & ~curved
        active = active & curved
        alpha = torch.where(active, rr / torch.where(curved, pap, torch.ones_like(pap)), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = r @ r
        beta = rr_next / torch.where(rr > 0, rr, torch.ones_like(rr))
        p = torch.where(active, r + beta * p, p)
        rr = torch.where(active, rr_next, rr)
        active = active & (rr > residual_tol)
    return torch.where(fallback, b, x)
