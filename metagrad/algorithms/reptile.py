"""Reptile (Nichol, Achiam & Schulman 2018, Alg. 2): k plain SGD steps on each task's support
set give φᵢ; the outer update is θ ← θ + ε · meanᵢ(φᵢ − θ). No second derivatives.

:meth:`Reptile.meta_gradient` writes g = θ − meanᵢ φᵢ into ``.grad``, so ``SGD(lr=ε)`` performs
exactly that update (and any other optimizer a variant of it, e.g. Adam as in the paper's
follow-up experiments).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from metagrad.algorithms.base import Capabilities
from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.functional import Params
from metagrad.core.taskbatch import Inputs, TaskBatch, check_task_batch


class Reptile(MAML):
    """Reptile on MAML's inner loop (``first_order`` and learned rates do not apply: the update
    uses no derivative of the inner steps)."""

    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False)

    @property
    def meta_gradient_first_order(self) -> bool:
        return True

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        check_task_batch(*batch.tensors())
        theta = {n: p.detach() for n, p in self.params().items()}

        def task(sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor) -> tuple[Params, Tensor]:
            phi = self.adapt(sx, sy, first_order=True, params=theta)
            with torch.no_grad():
                return phi, self.loss(phi, qx, qy)

        phis, losses = per_task(task, batch.tensors(), self.batching, self.model,
                                first_order=self.meta_gradient_first_order)
        for name, p in self.params().items():
            step = theta[name] - phis[name].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return losses.mean()
