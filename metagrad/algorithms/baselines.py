"""The baselines MAML is judged against (Finn et al. 2017, §5.1).

* ``Pretrained``: one model trained on the pooled examples of all training tasks (support and
  query together, no adaptation), then fine-tuned on each test task's support set with the same
  gradient steps as MAML.
* Training from scratch is :class:`metagrad.MAML`'s evaluation applied to a freshly initialised
  model (no meta-training); see :mod:`metagrad.training.experiment`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.algorithms.maml import MAML
from metagrad.core.taskbatch import TaskBatch


class Pretrained(MAML):
    """min_θ E_tasks L(θ; support ∪ query); evaluation fine-tunes θ like MAML adapts it."""

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        x = torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).flatten(0, 1)
        loss = self.loss(self.params(), x, y)
        loss.backward()
        return loss.detach()
