"""Figures of meta-RL runs: 2-D navigation trajectories before and after adaptation (MAML
Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from metagrad.rl.envs import Navigation2D
from metagrad.rl.maml_rl import MAMLRL
from metagrad.training.plots import legend_outside, save_figure


def mean_paths(actions: Tensor, masks: Tensor) -> Tensor:
    """``[tasks, T + 1, 2]``: the mean position over the rollouts at every time step, from the
    origin (an episode that has ended stays where it ended)."""
    m = Navigation2D.max_action
    moves = actions.clamp(-m, m) * masks[..., None]
    path = torch.cat([torch.zeros_like(moves[:, :, :1]), moves.cumsum(2)], 2)
    return path.mean(1)


def plot_navigation_trajectories(methods: dict[str, MAMLRL], tasks: Tensor, steps: int,
                                 rollouts: int, seed: int, path: Path) -> Path:
    """One panel per method (rows) and goal (columns): the mean path of the ``rollouts`` episodes
    after 0, 1, …, ``steps`` adaptation steps (each step adapts on them, as at evaluation), the
    start and the goal; one legend right of the panels. Writes ``path`` and returns it."""
    fig, axes = plt.subplots(len(methods), len(tasks),
                             figsize=(3.2 * len(tasks) + 1.5, 3.2 * len(methods)),
                             squeeze=False, layout="constrained")
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, steps + 1).tolist())
    for row, (name, learner) in enumerate(methods.items()):
        for k, ep in enumerate(learner.adaptation(tasks, steps, rollouts, seed)):
            label = "pre-update" if k == 0 else f"{k} step{'s' if k > 1 else ''}"
            for col, xy in enumerate(mean_paths(ep.actions, ep.masks)):
                axes[row][col].plot(xy[:, 0], xy[:, 1], "-", color=colours[k], lw=1.5,
                                    label=label)
        for col, goal in enumerate(tasks):
            ax = axes[row][col]
            ax.plot(0, 0, "ko", ms=4, label="start")
            ax.plot(goal[0], goal[1], "r*", ms=12, label="goal")
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xlabel("x")
            ax.set_ylabel("y")
            ax.set_title(f"{name}, goal ({goal[0]:.2f}, {goal[1]:.2f})", fontsize=9)
            ax.grid(alpha=0.3)
    legend_outside(fig, axes.flat)
    return save_figure(fig, path, dpi=110)
