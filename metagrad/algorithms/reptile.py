"""Reptile (Nichol, Achiam & Schulman 2018, Alg. 2): k plain SGD steps on each task's data give
φᵢ; the outer update is θ ← θ + ε · meanᵢ(φᵢ − θ). No second derivatives.

As in the paper and its code (``supervised-reptile``), the inner loop trains on all of a task's
training data, here its support and query sets together (``inner_data="task"``);
``inner_data="support"`` trains on the support set only, as the other algorithms adapt.
``inner_batch`` = b makes each step a minibatch, as the paper's code does: the k-th step takes the
k-th block of b examples of the task's data in a random order, drawn afresh (without
replacement) each time the data is used up. With disjoint minibatches the expected update
contains the term that raises the inner product of gradients of different batches
(the paper's §5, AvgGradInner); full-batch steps reduce it to joint training plus a
gradient-norm penalty. The paper's 1-shot Omniglot recipe trains on 10 images per class (here
1 shot + 9 queries), minibatches of 10, 5 steps. Evaluation adapts on the support set (full
batch), as every learner does.

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

    reptile_inner_batch: int | None = field(default=None, metadata={
        "help": "examples per inner step (minibatches drawn without replacement from the inner "
                "data, as the paper's code; none: all of it every step)"})

    def __post_init__(self) -> None:
        _check_options(self.reptile_inner_data, self.reptile_inner_batch)


def _check_options(inner_data: object, inner_batch: object) -> None:
    if inner_data not in INNER_DATA:
        raise ConfigError(f"reptile_inner_data must be one of {INNER_DATA}, got {inner_data!r}")
    if inner_batch is not None and (not isinstance(inner_batch, int)
                                    or isinstance(inner_batch, bool) or inner_batch < 1):
        raise ConfigError(f"reptile_inner_batch must be a positive integer or none, got "
                          f"{inner_batch!r}")


class Reptile(MAML):
    """Reptile on MAML's inner loop (``first_order`` and learned rates do not apply: the update
    uses no derivative of the inner steps); ``inner_data`` chooses the inner steps' data (see
    the module doc) and ``inner_batch`` its minibatch size (None: full batch); other keyword
    arguments are MAML's. :meth:`meta_gradient` returns the
    query loss at φᵢ (with ``inner_data="task"``, a loss on data the inner steps trained on)."""

    Options: ClassVar[type] = ReptileOptions
    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False,
                                                        precision=False)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, *,
                 inner_data: InnerData = "task", inner_batch: int | None = None,
                 **kwargs: Any) -> None:
        _check_options(inner_data, inner_batch)
        super().__init__(model, loss_fn, inner_lr, **kwargs)
        self.inner_data = inner_data
        self.inner_batch = inner_batch

    @classmethod
    def option_arguments(cls, options: ReptileOptions) -> dict[str, Any]:
        return dict(inner_data=options.reptile_inner_data,
                    inner_batch=options.reptile_inner_batch)

    def _minibatches(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """The tasks' inner data ``[tasks, n, ...]`` rearranged into the examples of the K
        minibatches in order, ``[tasks, K·b, ...]``: consecutive blocks of random permutations of
        the n examples (a fresh permutation whenever one is used up), drawn per task from
        torch's global generator (saved in checkpoints)."""
        assert self.inner_batch is not None
        tasks, n = y.shape[:2]
        needed = self.inner_steps * self.inner_batch
        epochs = -(-needed // n)
        order = torch.rand(tasks, epochs, n).argsort(dim=-1).reshape(tasks, -1)[:, :needed]
        order = order.to(y.device)

        def gather(t: Tensor) -> Tensor:
            index = order.reshape(tasks, needed, *([1] * (t.dim() - 2)))
            return t.gather(1, index.expand(tasks, needed, *t.shape[2:]))

        return map_inputs(gather, x), gather(y)

    @property
    def meta_gradient_first_order(self) -> bool:
        return True

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        check_task_batch(*batch.tensors())
        theta = {n: p.detach() for n, p in self.params().items()}

        sx, sy, qx, qy = batch.tensors()
        if self.inner_data == "task":
            x, y = map_inputs(lambda s, q: torch.cat([s, q], dim=1), sx, qx), torch.cat([sy, qy], 1)
        else:
            x, y = sx, sy
        if self.inner_batch is not None:
            x, y = self._minibatches(x, y)

        def task(x: Inputs, y: Tensor, qx: Inputs, qy: Tensor) -> tuple[Params, Tensor]:
            if self.inner_batch is None:
                phi = self.adapt(x, y, first_order=True, params=theta)
            else:
                phi, b = theta, self.inner_batch
                for k in range(self.inner_steps):
                    block = slice(k * b, (k + 1) * b)
                    phi = self.adapt(map_inputs(lambda t, block=block: t[block], x),
                                     y[block], steps=1, first_order=True, params=phi)
            with torch.no_grad():
                return phi, self.loss(phi, qx, qy)

        phis, losses = per_task(task, (x, y, qx, qy), self.batching, self.model,
                                first_order=self.meta_gradient_first_order)
        for name, p in self.params().items():
            step = theta[name] - phis[name].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return losses.mean()
