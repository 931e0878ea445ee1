"""Reptile (Nichol, Achiam & Schulman 2018, Alg. 2): k plain SGD steps on each task's data give
φᵢ; the outer update is θ ← θ + ε · meanᵢ(φᵢ − θ). No second derivatives.

As in the paper and its code (``supervised-reptile``), the inner loop trains on all of a task's
training data, here its support and query sets together (``inner_data="task"``, full batch
rather than the code's minibatches); ``inner_data="support"`` trains on the support set only,
as the other algorithms adapt. Evaluation adapts on the support set, as every learner does.

:meth:`Reptile.meta_gradient` writes g = θ − meanᵢ φᵢ into ``.grad``, so ``SGD(lr=ε)`` performs
exactly that update (and any other optimizer a variant of it, e.g. Adam as in the paper's
follow-up experiments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import Capabilities
from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.functional import Params
from metagrad.core.taskbatch import Inputs, LossFn, TaskBatch, check_task_batch, map_inputs
from metagrad.errors import ConfigError

InnerData = Literal["support", "task"]
INNER_DATA = ("support", "task")


@dataclass
class ReptileOptions:
    """Reptile's settings (``--reptile-...`` flags)."""

    reptile_inner_data: InnerData = field(default="task", metadata={
        "help": "data of the inner SGD steps: the task's support and query sets (task, as the "
                "paper) or the support set only"})

    def __post_init__(self) -> None:
        _check_inner_data(self.reptile_inner_data)


def _check_inner_data(value: object) -> None:
    if value not in INNER_DATA:
        raise ConfigError(f"reptile_inner_data must be one of {INNER_DATA}, got {value!r}")


class Reptile(MAML):
    """Reptile on MAML's inner loop (``first_order`` and learned rates do not apply: the update
    uses no derivative of the inner steps); ``inner_data`` chooses the inner steps' data (see
    the module doc); other keyword arguments are MAML's. :meth:`meta_gradient` returns the
    query loss at φᵢ (with ``inner_data="task"``, a loss on data the inner steps trained on)."""

    Options: ClassVar[type] = ReptileOptions
    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False,
                                                        precision=False)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, *,
                 inner_data: InnerData = "task", **kwargs: Any) -> None:
        _check_inner_data(inner_data)
        super().__init__(model, loss_fn, inner_lr, **kwargs)
        self.inner_data = inner_data

    @classmethod
    def option_arguments(cls, options: ReptileOptions) -> dict[str, Any]:
        return dict(inner_data=options.reptile_inner_data)

    @property
    def meta_gradient_first_order(self) -> bool:
        return True

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        check_task_batch(*batch.tensors())
        theta = {n: p.detach() for n, p in self.params().items()}

        def task(sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor) -> tuple[Params, Tensor]:
            if self.inner_data == "task":
                x = map_inputs(lambda s, q: torch.cat([s, q]), sx, qx)
                phi = self.adapt(x, torch.cat([sy, qy]), first_order=True, params=theta)
            else:
                phi = self.adapt(sx, sy, first_order=True, params=theta)
            with torch.no_grad():
                return phi, self.loss(phi, qx, qy)

        phis, losses = per_task(task, batch.tensors(), self.batching, self.model,
                                first_order=self.meta_gradient_first_order)
        for name, p in self.params().items():
            step = theta[name] - phis[name].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return losses.mean()
