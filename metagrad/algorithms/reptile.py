"""Reptile (Nichol, Achiam & Schulman 2018, Alg. 2): k plain SGD steps on each task's support
set give φᵢ; the outer update is θ ← θ + ε · meanᵢ(φᵢ − θ). No second derivatives.

:meth:`Reptile.meta_gradient` writes g = θ − meanᵢ φᵢ into ``.grad``, so ``SGD(lr=ε)`` performs
exactly that update (and any other optimizer a variant of it, e.g. Adam as in the paper's
follow-up experiments).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.taskbatch import TaskBatch


class Reptile(MAML):
    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        theta = {n: p.detach() for n, p in self.params().items()}

        def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> dict[str, Tensor]:
            phi = self.adapt(sx, sy, first_order=True, params=theta)
            with torch.no_grad():
                return {**phi, "__query_loss__": self.loss(phi, qx, qy)}

        out = per_task(task, batch.tensors(), self.batching, self.model, first_order=True)
        for name, p in self.params().items():
            step = theta[name] - out[name].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return out["__query_loss__"].mean()
