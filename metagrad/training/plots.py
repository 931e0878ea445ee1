"""Figures: the metric against adaptation steps (MAML Fig. 3) and, for sinusoid regression,
predictions before and after adaptation (MAML Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.maml import MAML
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training.evaluation import EvalRow


def plot_metric_vs_steps(rows: list[EvalRow], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, shots in sorted({(r.method, r.shots) for r in rows}):
        sel = sorted((r for r in rows if r.method == method and r.shots == shots),
                     key=lambda r: r.steps)
        steps = [r.steps for r in sel]
        mean = torch.tensor([r.mean for r in sel])
        ci = torch.tensor([r.ci95 for r in sel])
        if steps == [0]:  # no gradient steps (the black box): one point, its level dotted
            line = ax.errorbar(steps, mean, yerr=ci, marker="s", ms=5, capsize=3,
                               label=f"{method}, K={shots} (conditioned, no steps)").lines[0]
            ax.axhline(float(mean[0]), color=line.get_color(), ls=":", lw=1)
            continue
        line = ax.plot(steps, mean, marker="o", ms=3, label=f"{method}, K={shots}")[0]
        ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel(f"mean query {metric} (95% CI)")
    ax.set_title(f"{metric} after adaptation, {rows[0].tasks} test tasks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sinusoid_predictions(learners: dict[str, MAML | BlackBox], shots: int, path: Path,
                              generator: torch.Generator, steps: tuple[int, ...] = (0, 1, 10),
                              panels: int = 2) -> Path:
    """For ``panels`` test tasks and each learner: the true function, the K support points and the
    prediction after each number of ``steps`` (MAML Fig. 2); a black box's one prediction,
    conditioned on the support points."""
    tasks = SinusoidTasks(shots=shots, queries=1)
    amp, phase = tasks.sample_functions(panels, generator)
    batch = tasks.batch_for(amp, phase, generator)
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1)
    truth = SinusoidTasks.evaluate(amp, phase, grid.expand(panels, -1, -1))
    fig, axes = plt.subplots(panels, len(learners), figsize=(4.5 * len(learners), 3.2 * panels),
                             squeeze=False)
    for col, (name, learner) in enumerate(learners.items()):
        for row in range(panels):
            ax = axes[row][col]
            ax.plot(grid[0, :, 0], truth[row, :, 0], "r-", lw=1.5, label="ground truth")
            if isinstance(learner, BlackBox):
                pred = learner.predict(batch.support_x[row:row + 1],
                                       batch.support_y[row:row + 1], grid)
                ax.plot(grid[0, :, 0], pred[0, :, 0], "-", lw=1,
                        label=f"{name}, conditioned on the support set")
            else:
                _plot_steps(ax, name, learner, batch.support_x[row], batch.support_y[row], grid,
                            steps)
            ax.plot(batch.support_x[row, :, 0], batch.support_y[row, :, 0], "k^",
                    label="support points")
            ax.set_ylim(-5.5, 5.5)
            ax.set_title(f"{name}, K={shots}")
            if row == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_steps(ax: plt.Axes, name: str, learner: MAML, support_x: torch.Tensor,
                support_y: torch.Tensor, grid: torch.Tensor, steps: tuple[int, ...]) -> None:
    theta = {n: p.detach() for n, p in learner.params().items()}
    path_params = learner.adapt(support_x, support_y, max(steps), first_order=True,
                                trajectory=True, params=theta)
    for k in steps:
        with torch.no_grad():
            pred = learner.functional_forward(path_params[k], grid[0], step=k)
        ax.plot(grid[0, :, 0], pred[:, 0], "--" if k == 0 else "-", lw=1,
                label=f"{name}, {k} step{'s' if k != 1 else ''}")
