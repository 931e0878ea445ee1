"""Short meta-trainings for tests that compare two settings by the accuracy they reach."""

import math
from collections.abc import Callable

import torch

from metagrad import MAML, TaskBatch


def accuracy_after_training(learner: MAML, batch_at: Callable[[int], TaskBatch],
                            test: TaskBatch, iterations: int, lr: float = 3e-3
                            ) -> tuple[float, float]:
    """Mean accuracy on the queries of ``test`` after one adaptation step, and its 95%
    interval, once ``learner`` has taken ``iterations`` Adam steps on ``batch_at(i)``."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    for i in range(iterations):
        optimizer.zero_grad()
        learner.meta_gradient(batch_at(i))
        optimizer.step()
    curve = learner.evaluation_curve(test, 1, lambda out, y: (out.argmax(-1) == y).float().mean())
    accuracy = curve[:, -1]
    return accuracy.mean().item(), 1.96 * accuracy.std().item() / math.sqrt(len(accuracy))
