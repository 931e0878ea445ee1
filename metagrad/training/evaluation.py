"""Meta-test evaluation as papers report it: the query metric after 0, 1, …, N adaptation steps,
mean and 95% confidence interval (1.96·s/√n) over n held-out tasks.

The black-box baseline (:class:`~metagrad.algorithms.blackbox.BlackBox`) takes no gradient steps:
its adaptation is conditioning on the support set, so it has one column, reported at 0 steps
(its metric *after* reading the support set), never repeated as rows for 1..N steps."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.taskbatch import TaskSampler

METRICS = ("mse", "accuracy")


def query_metric(metric: str, output: Tensor, target: Tensor) -> Tensor:
    if metric == "mse":
        return (output - target).pow(2).mean()
    if metric == "accuracy":
        return (output.argmax(dim=-1) == target).float().mean()
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% interval, 1.96·std/√n."""
    values = values.double()
    n = values.numel()
    std = values.std(unbiased=True).item() if n > 1 else math.nan
    return values.mean().item(), 1.96 * std / math.sqrt(n)


def per_step_metrics(learner: MAML | BlackBox, sampler: TaskSampler, num_tasks: int,
                     max_steps: int, metric: str, generator: torch.Generator,
                     chunk: int = 50) -> Tensor:
    """``[num_tasks, max_steps + 1]``: the query metric of each task after 0..max_steps steps.

    Adaptation starts from a detached θ and uses first-order steps (identical values, no graph).
    A :class:`BlackBox` gives ``[num_tasks, 1]``: the metric of its predictions conditioned on
    the support set (no steps to take), computed in eval mode (BatchNorm running statistics, so
    each query's prediction is independent of the other queries).
    """
    if isinstance(learner, BlackBox):
        return conditioned_metrics(learner, sampler, num_tasks, metric, generator, chunk)
    theta = {n: p.detach() for n, p in learner.params().items()}

    def task_curve(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        path = learner.adapt(sx, sy, max_steps, first_order=True, trajectory=True, params=theta)
        with torch.no_grad():
            return torch.stack([
                query_metric(metric, learner.functional_forward(p, qx, step=k), qy)
                for k, p in enumerate(path)
            ])

    rows = []
    done = 0
    while done < num_tasks:
        batch = sampler.sample(min(chunk, num_tasks - done), generator)
        rows.append(per_task(task_curve, batch.tensors(), learner.batching, learner.model, True)
                    .detach())
        done += batch.num_tasks
    return torch.cat(rows)


def conditioned_metrics(learner: BlackBox, sampler: TaskSampler, num_tasks: int, metric: str,
                        generator: torch.Generator, chunk: int = 50) -> Tensor:
    """``[num_tasks, 1]``: the query metric of each task, the black box reading its support set."""
    rows = []
    done = 0
    while done < num_tasks:
        batch = sampler.sample(min(chunk, num_tasks - done), generator)
        out = learner.predict(batch.support_x, batch.support_y, batch.query_x)
        rows.append(torch.stack([query_metric(metric, o, y)
                                 for o, y in zip(out, batch.query_y, strict=True)]))
        done += batch.num_tasks
    return torch.cat(rows).unsqueeze(1)


@dataclass
class EvalRow:
    """One row of ``eval.json``."""

    method: str
    shots: int
    steps: int
    mean: float
    ci95: float
    tasks: int
    split: str
    ways: int | None = None

    def to_dict(self) -> dict:
        row = asdict(self)
        if row["ways"] is None:
            del row["ways"]
        return row


def rows_from_curves(curves: Tensor, method: str, shots: int, split: str,
                     ways: int | None = None) -> list[EvalRow]:
    return [
        EvalRow(method, shots, step, *mean_ci95(curves[:, step]), curves.shape[0], split, ways)
        for step in range(curves.shape[1])
    ]
