"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019): implicit meta-gradients.

Inner problem (Eq. 3): φ(θ) = argmin_φ L_support(φ) + λ/2 ‖φ − θ‖², approximated by
``inner_steps`` gradient steps from θ without keeping any graph. Meta-gradient (Lemma 1):

    dL_query(φ(θ))/dθ = (I + H/λ)⁻¹ ∇_φ L_query(φ),   H = ∇²_φ L_support(φ)

solved by ``cg_iterations`` of conjugate gradient with Hessian-vector products (Alg. 2), so
memory does not grow with the number of inner steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

from metagrad.algorithms.maml import MAML, LossFn
from metagrad.core.functional import Params
from metagrad.core.inner_loop import inner_loop
from metagrad.core.solvers import conjugate_gradient
from metagrad.errors import ConfigError
from metagrad.tasks.base import TaskBatch


class IMAML(MAML):
    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 inner_steps: int = 10, *, lam: float = 1.0, cg_iterations: int = 5,
                 **kwargs: Any) -> None:
        if kwargs.get("adapt") is not None or kwargs.get("learn_inner_lr"):
            raise ConfigError("iMAML adapts all parameters with a fixed inner rate; "
                              "remove adapt= / learn_inner_lr=")
        if not lam > 0:
            raise ConfigError(f"iMAML's regularisation lam must be > 0, got {lam}")
        kwargs["first_order"] = True  # the inner loop never keeps a graph
        super().__init__(model, loss_fn, inner_lr, inner_steps, **kwargs)
        self.lam = float(lam)
        self.cg_iterations = cg_iterations

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, trajectory: bool = False,
              params: Params | None = None,
              buffers: dict[str, Tensor] | None = None) -> Params | list[Params]:
        """Gradient steps on the proximally regularised support loss, from θ."""
        theta = {n: p.detach() for n, p in (self.params() if params is None else params).items()}

        def regularised(phi: Params) -> Tensor:
            prox = sum(((phi[n] - theta[n]) ** 2).sum() for n in theta)
            return self.loss(phi, support_x, support_y, buffers, batch_statistics=True) \
                + 0.5 * self.lam * prox

        return inner_loop(regularised, theta, steps=self.inner_steps if steps is None else steps,
                          lr=self.learning_rate(), first_order=True, trajectory=trajectory)

    def task_meta_gradient(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
                           ) -> tuple[Params, Tensor]:
        """(I + H/λ)⁻¹ ∇L_query(φ) for one task, and L_query(φ)."""
        buffers = self.functional.buffers()
        phi = self.adapt(sx, sy, buffers=buffers)
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

        def matvec(v: Tensor) -> Tensor:  # (I + H/λ) v
            hv = support_grad_vjp(as_params(v))[0]
            return v + torch.cat([hv[n].reshape(-1) for n in names]) / self.lam

        b = torch.cat([g[n].reshape(-1) for n in names])
        return as_params(conjugate_gradient(matvec, b, self.cg_iterations)[0]), query_loss

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        params = self.params()
        total: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p in params.items()}
        losses = []
        for task in zip(*batch.tensors(), strict=True):
            g, loss = self.task_meta_gradient(*task)
            losses.append(loss)
            for n in total:
                total[n] += g[n] / batch.num_tasks
        for n, p in params.items():
            p.grad = total[n] if p.grad is None else p.grad + total[n]
        return torch.stack(losses).mean()
