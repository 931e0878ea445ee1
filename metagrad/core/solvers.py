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
