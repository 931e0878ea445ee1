"""Trust-region policy optimisation (Schulman et al. 2015, App. C) on parameter dicts: the
meta-optimiser of MAML-RL (Finn et al. 2017, §5.3).

    minimise  loss(θ)  subject to  KL(θ_old, θ) ≤ δ     (loss = −surrogate advantage)

step direction s = F⁻¹g by conjugate gradient (F = ∇²KL at θ_old, g = ∇loss), scaled to the
boundary of the trust region, β = √(2δ / sᵀFs), then backtracking (θ − βᵏ·βs) until the loss
decreases and the KL constraint holds.

Products with F (:func:`hessian_vector_product`): double backward through the KL (``exact``),
finite differences of its gradient, or the Gauss–Newton form (``gauss_newton``): with the KL
written as D(f(θ)), f the policy's distribution parameters on the data and D the divergence
from π_old's, ∇²KL = Jᵀ ∇²D J + Σ_j ∂D/∂f_j ∇²f_j, J = ∂f/∂θ, and the second term vanishes at
θ_old, where D is at its minimum (∂D/∂f = 0). So Fv = Jᵀ(∇²D (Jv)): one forward-mode pass for
Jv, one backward pass for Jᵀu, and no differentiation of a backward pass, the costly part
through a recurrent policy (Martens 2010; Schulman et al. 2015, App. C.1, the "analytic"
Fisher-vector product).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from metagrad.core.functional import Params
from metagrad.core.solvers import conjugate_gradient
from metagrad.errors import ConfigError

Objective = Callable[[Params], tuple[Tensor, Tensor]]
"""params -> (surrogate loss to minimise, mean KL(π_old ‖ π_params))."""

HVPMode = Literal["exact", "finite_difference", "gauss_newton"]

Reduce = Callable[[Tensor], Tensor]
"""Combines a quantity computed on this process's share of the data with the other processes'
(:meth:`metagrad.distributed.Distributed.reduce`); the identity in a single process."""


def _local(tensor: Tensor) -> Tensor:
    return tensor


def flatten(tensors: Mapping[str, Tensor]) -> Tensor:
    """The tensors of a dict (in its order) as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: a dict shaped like ``like``."""
    total = sum(t.numel() for t in like.values())
    if total != vector.numel():
        raise ConfigError(f"vector has {vector.numel()} entries but the parameters have {total}")
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start:start + t.numel()].view_as(t)
        start += t.numel()
    return out


@dataclass(frozen=True)
class ComposedKL:
    """KL(π_old ‖ π_θ) as ``divergence(outputs(θ))``: ``outputs`` maps parameters to the
    policy's distribution parameters on the data (e.g. its means and standard deviations),
    ``divergence`` those to the mean KL from π_old's. Callable as the KL itself; the form the
    ``gauss_newton`` products need (module doc)."""

    outputs: Callable[[Params], tuple[Tensor, ...]]
    divergence: Callable[[tuple[Tensor, ...]], Tensor]

    def __call__(self, params: Params) -> Tensor:
        return self.divergence(self.outputs(params))


def hessian_vector_product(fn: Callable[[Params], Tensor], params: Params, *,
                           mode: HVPMode = "exact", damping: float = 1e-5,
                           fd_eps: float = 1e-4, value: Tensor | None = None
                           ) -> Callable[[Tensor], Tensor]:
    """v ↦ (∇²fn(params) + damping·I) v on flat vectors.

    ``"exact"``: double backward through ``fn`` (and so through any adaptation step inside it);
    ``value`` may pass ``fn(params)`` if already computed with a graph. ``"finite_difference"``:
    (∇fn(θ + εv̂) − ∇fn(θ − εv̂)) ‖v‖ / 2ε with v̂ = v/‖v‖ — first derivatives only.
    ``"gauss_newton"``: Jᵀ(∇²D (Jv)) for ``fn`` a :class:`ComposedKL` D∘f (module doc) — the
    Hessian at the θ_old the KL is measured from, positive semi-definite elsewhere.
    """
    names = list(params)
    if mode == "gauss_newton":
        if not isinstance(fn, ComposedKL):
            raise ConfigError("hvp 'gauss_newton' needs the KL as a ComposedKL (the policy's "
                              "outputs and the divergence); use 'exact' for any other function")
        return _gauss_newton_product(fn, params, damping)
    if mode == "exact":
        value = fn(params) if value is None else value
        grads = flatten(dict(zip(names, torch.autograd.grad(
            value, list(params.values()), create_graph=True, materialize_grads=True), strict=True)))

        def exact(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(grads @ v, list(params.values()), retain_graph=True,
                                     materialize_grads=True)
            return torch.cat([h.reshape(-1) for h in hv]).detach() + damping * v

        return exact
    if mode == "finite_difference":
        base = flatten({n: p.detach() for n, p in params.items()})

        def gradient_at(x: Tensor) -> Tensor:
            point = {n: t.requires_grad_() for n, t in unflatten(x.clone(), params).items()}
            return flatten(dict(zip(names, torch.autograd.grad(fn(point), list(point.values())),
                                    strict=True)))

        def finite_difference(v: Tensor) -> Tensor:
            norm = v.norm()
            if norm == 0:
                return torch.zeros_like(v)
            step = fd_eps * v / norm
            diff = gradient_at(base + step) - gradient_at(base - step)
            return diff * (norm / (2 * fd_eps)) + damping * v

        return finite_difference
    raise ConfigError(f"hvp mode must be 'exact', 'finite_difference' or 'gauss_newton', got "
                      f"{mode!r}")


def _gauss_newton_product(kl: ComposedKL, params: Params, damping: float
                          ) -> Callable[[Tensor], Tensor]:
    outputs = kl.outputs(params)
    at = tuple(o.detach().requires_grad_() for o in outputs)
    divergence_grad = torch.autograd.grad(kl.divergence(at), at, create_graph=True)
    primal = {n: p.detach() for n, p in params.items()}

    def gauss_newton(v: Tensor) -> Tensor:
        tangents = unflatten(v, params)
        with forward_ad.dual_level():
            dual = {n: forward_ad.make_dual(primal[n], tangents[n]) for n in primal}
            jv = [forward_ad.unpack_dual(o).tangent for o in kl.outputs(dual)]
        jv = [torch.zeros_like(o) if t is None else t for o, t in zip(at, jv, strict=True)]
        hjv = torch.autograd.grad(divergence_grad, at, jv, retain_graph=True)
        fv = torch.autograd.grad(outputs, list(params.values()), hjv, retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return torch.cat([f.reshape(-1) for f in fv]).detach() + damping * v

    return gauss_newton


@dataclass(frozen=True)
class TRPOResult:
    params: Params
    """The new (detached) parameters; the old ones when no step was accepted."""
    accepted: bool
    step_fraction: float
    """Fraction of the full trust-region step taken (0 when rejected)."""
    loss_before: float
    loss_after: float
    kl: float


def line_search(objective: Objective, params: Params, full_step: Tensor, loss_before: float, *,
                max_kl: float, steps: int = 15, backtrack: float = 0.8,
                reduce: Reduce = _local) -> TRPOResult:
    """Tries θ − βᵏ·full_step for k = 0 … steps−1; accepts the first with a lower loss and
    KL ≤ max_kl (both passed through ``reduce``)."""
    start = {n: p.detach() for n, p in params.items()}
    base = flatten(start)
    for k in range(steps):
        fraction = backtrack ** k
        candidate = unflatten(base - fraction * full_step, start)
        with torch.no_grad():
            loss, kl = reduce(torch.stack(objective(candidate))).tolist()
        if float(loss) < loss_before and float(kl) <= max_kl:
            return TRPOResult(candidate, True, fraction, loss_before, float(loss), float(kl))
    return TRPOResult(start, False, 0.0, loss_before, loss_before, 0.0)


def trpo_step(objective: Objective, params: Params, *, max_kl: float = 0.01,
              cg_iters: int = 10, cg_damping: float = 1e-5, ls_steps: int = 15,
              ls_backtrack: float = 0.8, hvp: HVPMode = "exact",
              curvature: Callable[[Params], Tensor] | None = None,
              reduce: Reduce = _local) -> TRPOResult:
    """One TRPO update of ``params`` (which must require grad) on ``objective``.

    ``curvature``: the function whose Hessian at ``params`` is the trust-region metric F;
    default the objective's KL (``hvp="gauss_newton"`` needs it given, as a
    :class:`ComposedKL`). Passing the KL of a subset of the data gives the subsampled
    Fisher-vector products of Schulman et al. 2015, App. C.1; the gradient and the line search's
    KL check always use all of it. sᵀFs is taken from the conjugate-gradient residual
    (Fs = g − r), so the solve costs ``cg_iters`` products and no more.

    Data-parallel: with each process's ``objective`` on its share of the data, ``reduce`` combines
    the gradient, every Fisher-vector product and the line search's loss and KL, so that every
    process takes the same step.
    """
    loss, kl = objective(params)
    grad = reduce(flatten(dict(zip(params, torch.autograd.grad(
        loss, list(params.values()), retain_graph=True), strict=True))))
    reuse = hvp == "exact" and curvature is None
    local_fvp = hessian_vector_product(curvature or (lambda p: objective(p)[1]), params,
                                       mode=hvp, damping=cg_damping, value=kl if reuse else None)
    direction, residual = conjugate_gradient(lambda v: reduce(local_fvp(v)), grad,
                                             iters=cg_iters)
    shs = 0.5 * (direction @ (grad - residual))
    loss_before = float(reduce(loss.detach()))
    if not shs > 0:
        return TRPOResult({n: p.detach() for n, p in params.items()}, False, 0.0, loss_before,
                          loss_before, 0.0)
    full_step = direction * torch.sqrt(max_kl / shs)
    return line_search(objective, params, full_step, loss_before, max_kl=max_kl,
                       steps=ls_steps, backtrack=ls_backtrack, reduce=reduce)
