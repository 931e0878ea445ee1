"""The baselines MAML is judged against (Finn et al. 2017, §5.1).

* ``Pretrained``: one model trained on the pooled examples of all training tasks (support and
  query together, no adaptation), then fine-tuned on each test task's support set with the same
  gradient steps as MAML.
* Training from scratch is :class:`metagrad.MAML`'s evaluation applied to a freshly initialised
  model (no meta-training); see :mod:`metagrad.training.experiment`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from metagrad.algorithms.base import Capabilities
from metagrad.algorithms.maml import MAML
from metagrad.core.taskbatch import TaskBatch, check_task_batch, map_inputs, task_tensors


class Pretrained(MAML):
    """min_θ E_tasks L(θ; support ∪ query); evaluation fine-tunes θ like MAML adapts it.

    Built beside the chosen algorithm from the same settings, use
    ``Pretrained.capabilities.applicable(settings)``: ``first_order``, ``learn_inner_lr``,
    ``compile`` and ``checkpoint_inner_steps`` do not apply to its training."""

    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False,
                                                        precision=False)

    @property
    def meta_gradient_first_order(self) -> bool:
        return True

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        check_task_batch(*task_tensors(batch))
        x = map_inputs(lambda s, q: torch.cat([s, q], dim=1).flatten(0, 1), batch.support_x,
                       batch.query_x)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).flatten(0, 1)
        loss = self.loss(self.params(), x, y)
        loss.backward()
        return loss.detach()
