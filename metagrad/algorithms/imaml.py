"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019): implicit meta-gradients.

Inner problem (Eq. 3): φ(θ) = argmin_φ L_support(φ) + λ/2 ‖φ − θ‖², approximated by
``inner_steps`` steps of monotone gradient descent from θ without keeping any graph.
Meta-gradient (Lemma 1):

    dL_query(φ(θ))/dθ = (I + H/λ)⁻¹ ∇_φ L_query(φ),   H = ∇²_φ L_support(φ)

solved by ``cg_iterations`` of conjugate gradient with Hessian-vector products (Alg. 2), so
memory does not grow with the number of inner steps.

Two variants of the authors' public Omniglot code (``aravindr93/imaml_dev``) are options, off by
default, so that the paper's equations stay the default:

* ``inner="plain"``: the inner loop is ``inner_steps`` plain gradient steps of ``inner_lr`` on the
  support loss alone (MAML's Eq. 1, no graph kept), and before the implicit gradient one step of
  ``inner_lr`` on the proximal term pulls φ back towards θ: φ ← φ − αλ(φ − θ). Adaptation at test
  time is the plain steps without the pull-back (their evaluation runs with λ = 0).
* ``cg_damping`` δ and ``lambda_damping`` λ_d: CG solves ((1 + δ) I + H/(λ + λ_d)) g = ∇L_query
  instead of (I + H/λ) g = ∇L_query (their code: δ = 1, λ_d = 10).

The formula holds at a local minimum of the regularised problem, where H + λI is positive
definite. With too few inner steps (or a small λ) φ is not there, I + H/λ can have negative
eigenvalues, and plain CG on it returns arbitrarily large vectors of arbitrary sign. CG therefore
stops at the first direction of non-positive curvature
(:func:`~metagrad.core.solvers.guarded_conjugate_gradient`). Tasks are batched with ``vmap``
where exact in second order (Hessian-vector products; see :mod:`metagrad.core.batching`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vjp

from metagrad.algorithms.base import Capabilities, require_integer, require_positive
from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.functional import Params, double_backward_kernels
from metagrad.core.solvers import guarded_conjugate_gradient
from metagrad.core.taskbatch import Inputs, LossFn, TaskBatch, check_task_batch, task_tensors
from metagrad.errors import ConfigError


@dataclass
class IMAMLOptions:
    """iMAML's settings (``--imaml-...`` flags)."""

    imaml_lambda: float = field(default=1.0, metadata={
        "help": "λ, strength of the proximal term λ/2 ‖φ − θ‖² of the inner problem"})
    imaml_cg_iterations: int = field(default=5, metadata={
        "help": "conjugate-gradient iterations of the implicit meta-gradient solve"})
    imaml_inner: InnerSolver = field(default="proximal", metadata={
        "help": "inner loop: proximal (the paper's Eq. 3, monotone gradient descent on the "
                "support loss + lambda/2 |phi - theta|^2) or plain (the authors' code: plain "
                "steps on the support loss, then one step pulling phi back towards theta; "
                "evaluation without the pull-back; the one that learns on Omniglot, see the "
                "README)"})
    imaml_cg_damping: float = field(default=0.0, metadata={
        "help": "delta in the CG system ((1 + delta) I + H/(lambda + lambda_damping)) g = "
                "grad L_query (the paper: 0; the authors' code: 1)"})
    imaml_lambda_damping: float = field(default=0.0, metadata={
        "help": "added to lambda in the curvature term of the CG system (the paper: 0; the "
                "authors' code: 10)"})

    def __post_init__(self) -> None:
        _check_options(self.imaml_lambda, self.imaml_cg_iterations, self.imaml_inner,
                       self.imaml_cg_damping, self.imaml_lambda_damping)


InnerSolver = Literal["proximal", "plain"]
INNER_SOLVERS = ("proximal", "plain")


def _check_options(lam: object, cg_iterations: object, inner: object, cg_damping: object,
                   lambda_damping: object) -> None:
    require_positive("imaml_lambda", lam)
    require_integer("imaml_cg_iterations", cg_iterations, 1)
    if inner not in INNER_SOLVERS:
        raise ConfigError(f"imaml_inner must be one of {INNER_SOLVERS}, got {inner!r}")
    require_positive("imaml_cg_damping", cg_damping, allow_zero=True)
    require_positive("imaml_lambda_damping", lambda_damping, allow_zero=True)


class IMAML(MAML):
    """iMAML with regularisation ``lam`` (λ), ``cg_iterations`` of CG, the inner solver
    ``inner`` and the CG system's ``cg_damping`` and ``lambda_damping`` (module docstring); other
    keyword arguments are MAML's, except ``adapt``, ``learn_inner_lr`` and ``first_order`` (all
    parameters adapt with a fixed rate; the inner loop keeps no graph by construction)."""

    Options: ClassVar[type] = IMAMLOptions
    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False,
                                                        precision=False)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 inner_steps: int = 10, *, lam: float = 1.0, cg_iterations: int = 5,
                 inner: InnerSolver = "proximal", cg_damping: float = 0.0,
                 lambda_damping: float = 0.0, **kwargs: Any) -> None:
        if kwargs.get("adapt") is not None or kwargs.get("learn_inner_lr"):
            raise ConfigError("iMAML adapts all parameters with a fixed inner rate; "
                              "remove adapt= / learn_inner_lr=")
        if kwargs.get("first_order"):
            raise ConfigError("iMAML's meta-gradient is implicit (Hessian-vector products at "
                              "the inner solution) and its inner loop keeps no graph; "
                              "first_order does not apply: remove it")
        _check_options(lam, cg_iterations, inner, cg_damping, lambda_damping)
        kwargs["first_order"] = True  # the inner loop never keeps a graph
        super().__init__(model, loss_fn, inner_lr, inner_steps, **kwargs)
        self.lam = float(lam)
        self.cg_iterations = cg_iterations
        self.inner = inner
        self.cg_damping = float(cg_damping)
        self.lambda_damping = float(lambda_damping)

    @property
    def meta_gradient_first_order(self) -> bool:
        return False  # Hessian-vector products

    @classmethod
    def option_arguments(cls, options: IMAMLOptions) -> dict[str, Any]:
        return dict(lam=options.imaml_lambda, cg_iterations=options.imaml_cg_iterations,
                    inner=options.imaml_inner, cg_damping=options.imaml_cg_damping,
                    lambda_damping=options.imaml_lambda_damping)

    def adapt(self, support_x: Inputs, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, trajectory: bool = False,
              params: Params | None = None,
              buffers: dict[str, Tensor] | None = None) -> Params | list[Params]:
        """The inner solver from θ: with ``inner="plain"`` MAML's plain steps on the support
        loss (:meth:`MAML.adapt <metagrad.algorithms.maml.MAML.adapt>`, no graph kept);
        otherwise monotone gradient descent on the proximally regularised support loss.

        A step that would increase the regularised loss is not taken and this task's rate is
        halved instead (per task and branch-free, so it runs under vmap); with a rate small
        enough for the task's curvature this is plain gradient descent. The implicit gradient
        depends only on where the inner solver ends, not on its path (the paper's point), so any
        descent method is admissible; a fixed rate is not safe, since meta-training sharpens the
        support loss until a step of ``inner_lr`` can overshoot, which the implicit gradient
        cannot see. ``first_order`` is ignored (no graph is ever kept)."""
        if self.inner == "plain":
            return super().adapt(support_x, support_y, steps, first_order=True,
                                 trajectory=trajectory, params=params, buffers=buffers)
        steps, _, params, buffers = self.adaptation_defaults(
            support_x, support_y, steps, first_order, params, buffers)
        theta = {n: p.detach() for n, p in params.items()}

        def regularised(phi: Params) -> Tensor:
            prox = sum(((phi[n] - theta[n]) ** 2).sum() for n in theta)
            return self.loss(phi, support_x, support_y, buffers, batch_statistics=True) \
                + 0.5 * self.lam * prox

        value_and_grad = grad_and_value(regularised)
        phi, path = theta, [theta]
        lr = torch.full((), self.inner_lr, dtype=next(iter(theta.values())).dtype)
        for _ in range(steps):
            g, value = value_and_grad(phi)
            trial = {n: phi[n] - lr * g[n] for n in phi}
            accept = regularised(trial) <= value
            phi = {n: torch.where(accept, trial[n], phi[n]) for n in phi}
            lr = torch.where(accept, lr, 0.5 * lr)
            if trajectory:
                path.append(phi)
        return path if trajectory else phi

    def task_meta_gradient(self, sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor,
                           buffers: dict[str, Tensor] | None = None) -> tuple[Params, Tensor]:
        """((1 + δ) I + H/(λ + λ_d))⁻¹ ∇L_query(φ) for one task, and L_query(φ)."""
        buffers = self.functional.buffers() if buffers is None else buffers
        phi = self.adapt(sx, sy, buffers=buffers)
        if self.inner == "plain":  # one step of α on λ/2 ‖φ − θ‖²
            pull, theta = self.inner_lr * self.lam, self.params()
            phi = {n: p - pull * (p - theta[n].detach()) for n, p in phi.items()}
        names = list(phi)

        def query(p: Params) -> tuple[Tensor, Tensor]:
            loss = self.loss(p, qx, qy, buffers)
            return loss, loss.detach()

        g, query_loss = grad(query, has_aux=True)(phi)
        support_grad = grad(lambda p: self.loss(p, sx, sy, buffers, batch_statistics=True))
        shapes = [phi[n].shape for n in names]

        def as_params(v: Tensor) -> Params:
            return dict(zip(names, (c.view(s) for c, s in zip(
                torch.split(v, [s.numel() for s in shapes]), shapes, strict=True)), strict=True))

        _, support_grad_vjp = vjp(support_grad, phi)  # H is symmetric: vᵀH = (Hv)ᵀ

        def matvec(v: Tensor) -> Tensor:  # ((1 + δ) I + H/(λ + λ_d)) v
            hv = support_grad_vjp(as_params(v))[0]
            return (1.0 + self.cg_damping) * v + torch.cat(
                [hv[n].reshape(-1) for n in names]) / (self.lam + self.lambda_damping)

        b = torch.cat([g[n].reshape(-1) for n in names])
        return as_params(guarded_conjugate_gradient(matvec, b, self.cg_iterations)), query_loss

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        tasks = task_tensors(batch)
        check_task_batch(*tasks)
        buffers = self.functional.buffers()

        def task(sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor) -> tuple[Params, Tensor]:
            return self.task_meta_gradient(sx, sy, qx, qy, buffers)

        with double_backward_kernels(True):  # Hessian-vector products: second order
            grads, losses = per_task(task, tasks, self.batching, self.model,
                                     first_order=self.meta_gradient_first_order)
        for n, p in self.params().items():
            step = grads[n].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return losses.mean()
