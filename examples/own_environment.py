"""Meta-train MAML-RL on your own gymnasium environment.

The environment needs continuous (Box) observations and actions and a hook that sets its task;
:class:`~metagrad.rl.envs.GymnasiumTasks` turns it into the batched environment MAML-RL samples
from. Here a point must reach a goal drawn per task, as in the MAML paper's 2-D navigation.

    python examples/own_environment.py
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import Env, spaces

from metagrad.rl.envs import GymnasiumTasks
from metagrad.rl.maml_rl import MAMLRL, RLConfig


class PointToGoal(Env):
    """Start at the origin, move by the action (at most 0.1 per coordinate), reward −‖x − goal‖,
    done within 0.05 of the goal. ``set_task(goal)`` chooses the goal."""

    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = spaces.Box(-0.1, 0.1, (2,), np.float32)

    def __init__(self) -> None:
        self.goal = np.zeros(2)
        self.position = np.zeros(2)

    def set_task(self, goal: np.ndarray) -> None:
        self.goal = np.asarray(goal, dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = np.zeros(2)
        return self.position.copy(), {}

    def step(self, action: np.ndarray):
        self.position = self.position + action
        distance = float(np.linalg.norm(self.position - self.goal))
        return self.position.copy(), -distance, distance < 0.05, False, {}


def sample_goals(n: int, generator: torch.Generator) -> torch.Tensor:
    """p(T): goals uniform in [−0.5, 0.5]², one row per task."""
    return torch.rand(n, 2, generator=generator) - 0.5


def make_env(config: RLConfig, device: torch.device) -> GymnasiumTasks:
    """The environment built from a run's settings; with this folder on PYTHONPATH,
    ``RLConfig(env="own_environment:make_env")`` (``--env own_environment:make_env``) names
    it."""
    return GymnasiumTasks(PointToGoal, sample_goals, set_task="set_task",
                          horizon=config.horizon or 20, device=device)


def main() -> None:
    torch.set_num_threads(1)
    config = RLConfig(env="point-to-goal", meta_batch=10, rollouts=10, hidden=(32, 32),
                      inner_lr=0.1, seed=0)
    env = make_env(config, torch.device("cpu"))
    learner = MAMLRL(config, env=env)
    held_out = env.sample_tasks(20, torch.Generator().manual_seed(1234))
    before, after = learner.evaluate(held_out, steps=1, rollouts=10)
    print(f"untrained: return {before:.2f} before adaptation, {after:.2f} after one step")
    for _ in range(15):
        metrics = learner.meta_step()
        print(f"meta-iteration {int(metrics['iteration']):2d}: return "
              f"{metrics['pre_return']:.2f} before adaptation, {metrics['post_return']:.2f} after")
    before, after = learner.evaluate(held_out, steps=1, rollouts=10)
    print(f"held-out tasks: return {before:.2f} before adaptation, {after:.2f} after one step")


if __name__ == "__main__":
    main()
