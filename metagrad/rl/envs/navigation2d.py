"""2-D navigation of the MAML paper (Finn et al. 2017, §5.3), batched in torch.

A point agent starts at the origin and must reach a goal drawn uniformly from [−0.5, 0.5]². The
observation is the position; the action is the displacement, clipped to [−0.1, 0.1] per
coordinate. With ``normalized_actions`` (the authors' code, through rllab's ``normalize``
wrapper) the policy's action a is in units of that bound: the move is clip(0.1·a, ±0.1). The
reward is the negative squared distance to the goal after the move (the paper's text; the
authors' code uses the negative distance: ``squared_distance=False``). An episode ends within
0.01 of the goal or after H = 100 steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metagrad.errors import ConfigError

if TYPE_CHECKING:
    from metagrad.rl.settings import RLConfig


class Navigation2D:
    """All tasks × rollouts advance in one tensor operation on ``device`` (see the module doc for
    the rules); ``horizon`` None is H = 100."""

    obs_dim = 2
    act_dim = 2
    goal_range = 0.5
    max_action = 0.1
    goal_radius = 0.01
    default_horizon = 100

    def __init__(self, horizon: int | None = None, squared_distance: bool = True,
                 normalized_actions: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        horizon = self.default_horizon if horizon is None else horizon
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.squared_distance = squared_distance
        self.action_scale = self.max_action if normalized_actions else 1.0
        self.dtype = dtype
        self.device = torch.device(device)
        self.goals = torch.zeros(0, 2, dtype=dtype, device=self.device)
        self.position = torch.zeros(0, 0, 2, dtype=dtype, device=self.device)

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tensor:
        """Goals ``[n, 2]`` uniform in [−0.5, 0.5]² (drawn on the generator's device)."""
        u = torch.rand(n, 2, generator=generator, dtype=self.dtype, device=generator.device)
        return ((u * 2 - 1) * self.goal_range).to(self.device)

    def reset_task(self, tasks: Tensor) -> None:
        if tasks.dim() != 2 or tasks.shape[1] != 2:
            raise ConfigError(
                f"navigation2d tasks are goals of shape [n, 2], got {tuple(tasks.shape)}"
            )
        self.goals = tasks.to(self.device, self.dtype)

    def reset(self, rollouts: int, generator: torch.Generator | None = None) -> Tensor:
        """Every episode starts at the origin (no randomness)."""
        self.position = torch.zeros(len(self.goals), rollouts, 2, dtype=self.dtype,
                                    device=self.device)
        return self.position.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if actions.shape != self.position.shape:
            raise ConfigError(
                f"actions must have shape {tuple(self.position.shape)} [tasks, rollouts, 2], "
                f"got {tuple(actions.shape)}"
            )
        move = (actions.to(self.device, self.dtype) * self.action_scale).clamp(-self.max_action,
                                                                   self.max_action)
        self.position = self.position + move
        sq_dist = (self.position - self.goals[:, None, :]).square().sum(-1)
        reward = -sq_dist if self.squared_distance else -sq_dist.sqrt()
        done = sq_dist < self.goal_radius ** 2
        return self.position.clone(), reward, done


def from_config(config: RLConfig, device: torch.device) -> Navigation2D:
    """The registry's factory: ``horizon``, ``nav_reward`` and ``nav_normalized_actions``."""
    return Navigation2D(horizon=config.horizon,
                        squared_distance=config.nav_reward == "squared_distance",
                        normalized_actions=config.nav_normalized_actions, device=device)
