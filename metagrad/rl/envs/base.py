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

from metagrad.errors import ConfigError


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


ENV_ATTRIBUTES = ("obs_dim", "act_dim", "horizon")
ENV_METHODS = ("sample_tasks", "reset_task", "reset", "step")


def check_env(env: object) -> None:
    """Refuses an object that lacks what :class:`BatchedEnv` requires, naming what is missing
    (a plain ``gymnasium.Env`` is pointed to the wrapper that makes it one)."""
    missing = [a for a in ENV_ATTRIBUTES if not hasattr(env, a)] + [
        m for m in ENV_METHODS if not callable(getattr(env, m, None))]
    if not missing:
        return
    hint = ("it looks like a gymnasium.Env: wrap it as GymnasiumTasks(make_env=..., "
            "sample_tasks=..., set_task=..., horizon=...) from metagrad.rl.envs.gymnasium"
            if hasattr(env, "observation_space") and hasattr(env, "action_space") else
            "see metagrad.rl.envs.base.BatchedEnv, or wrap a gymnasium.Env with "
            "metagrad.rl.envs.gymnasium.GymnasiumTasks")
    raise ConfigError(f"the RL environment ({type(env).__name__}) is not a batched meta-RL "
                      f"environment: it lacks {', '.join(missing)}; {hint}")
