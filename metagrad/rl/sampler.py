"""Batched episode sampling: every task's rollouts run in one loop over time, the policy evaluated
once per step for all of them (per-task adapted parameters through ``vmap``).

Episodes live on the device of the policy's parameters: observations, rewards and ``done`` are
moved there from wherever the environment simulates; the action noise is drawn on the
generator's device (so a seed gives the same episodes on every device)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.envs.base import BatchedEnv


@dataclass(frozen=True)
class Episodes:
    """Padded episodes of a batch of tasks: ``obs`` ``[tasks, rollouts, T, obs_dim]``,
    ``actions`` ``[tasks, rollouts, T, act_dim]``, ``rewards``/``masks`` ``[tasks, rollouts, T]``
    (mask 1 on the steps taken, 0 after the episode ended)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    masks: Tensor

    def returns(self) -> Tensor:
        """Undiscounted return of every episode: ``[tasks, rollouts]``."""
        return (self.rewards * self.masks).sum(-1)


def action_distribution(policy: GaussianMLPPolicy, params: Mapping[str, Tensor], obs: Tensor,
                        per_task: bool) -> tuple[Tensor, Tensor]:
    """(mean, std) of π_params(·|obs) for ``obs`` ``[tasks, ...]``; with ``per_task`` every
    tensor of ``params`` has a leading task dimension."""
    if not per_task:
        dist = policy.distribution(obs, params)
        return dist.loc, dist.scale

    def one_task(p: dict[str, Tensor], o: Tensor) -> tuple[Tensor, Tensor]:
        dist = policy.distribution(o, p)
        return dist.loc, dist.scale

    return vmap(one_task)(dict(params), obs)


@torch.no_grad()
def sample_episodes(policy: GaussianMLPPolicy, params: Mapping[str, Tensor], env: BatchedEnv,
                    rollouts: int, generator: torch.Generator, *,
                    per_task: bool = False) -> Episodes:
    """``rollouts`` episodes on each of the env's current tasks (set by ``env.reset_task``),
    actions a ~ π_params(·|s) given to ``env.step`` on the parameters' device; stops early once
    every episode is done. Steps after an episode's first ``done`` are padding (mask 0)."""
    device = next(iter(params.values())).device
    obs = env.reset(rollouts, generator).to(device)
    tasks, horizon = obs.shape[0], env.horizon
    all_obs = obs.new_zeros(tasks, rollouts, horizon, env.obs_dim)
    actions = obs.new_zeros(tasks, rollouts, horizon, env.act_dim)
    rewards = obs.new_zeros(tasks, rollouts, horizon)
    masks = obs.new_zeros(tasks, rollouts, horizon)
    alive = torch.ones(tasks, rollouts, dtype=torch.bool, device=device)
    for t in range(horizon):
        mean, std = action_distribution(policy, params, obs, per_task)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device)
        action = mean + std * noise.to(device)
        all_obs[:, :, t] = obs
        actions[:, :, t] = action
        masks[:, :, t] = alive.to(masks.dtype)
        obs, reward, done = env.step(action)
        obs = obs.to(device)
        rewards[:, :, t] = reward.to(device) * alive
        alive = alive & ~done.to(device)
        if not alive.any():
            break
    return Episodes(all_obs, actions, rewards, masks)
