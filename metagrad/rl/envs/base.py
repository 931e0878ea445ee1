"""The batched-environment interface every MAML-RL environment implements.

One environment object holds a batch of tasks and, per task, a batch of rollouts; ``step``
advances all of them at once. Observations, actions and rewards are torch tensors shaped
``[tasks, rollouts, ...]``, on any device: the sampler moves what the environment returns to the
policy's device, and the environment moves the actions to wherever it simulates.

An episode ends at its first ``done`` (or after ``horizon`` steps); what the environment returns
for it afterwards is ignored (masked out by the sampler).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class BatchedEnv(Protocol):
    obs_dim: int
    act_dim: int
    horizon: int
    """Episode length H (episodes may end earlier through ``done``)."""

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` tasks drawn from the task distribution p(T), one row each."""
        ...

    def reset_task(self, tasks: Tensor) -> None:
        """Selects the tasks the next episodes are run on."""
        ...

    def reset(self, rollouts: int, generator: torch.Generator) -> Tensor:
        """Starts ``rollouts`` episodes per task; the initial observations."""
        ...

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(observations, rewards, done) after applying ``actions`` ``[tasks, rollouts, act]``."""
        ...
