"""Meta-test evaluation as papers report it: the query metric after 0, 1, …, N adaptation steps,
mean and 95% confidence interval (1.96·s/√n) over n held-out tasks.

A learner without an inner loop (the black-box baseline) has one column, reported at 0 steps
(its metric after conditioning on the support set), never repeated as rows for 1..N steps."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from metagrad.algorithms.base import Learner
from metagrad.core.taskbatch import TaskSampler

METRICS = ("mse", "accuracy")


def query_metric(metric: str, output: Tensor, target: Tensor) -> Tensor:
    """One task's query metric: mean squared error, or the fraction of correct labels."""
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


def evaluation_curves(learner: Learner, sampler: TaskSampler, num_tasks: int, max_steps: int,
                      metric: str, generator: torch.Generator,
                      device: torch.device | str = "cpu", chunk: int = 50) -> Tensor:
    """``[num_tasks, max_steps + 1]`` (``[num_tasks, 1]`` without an inner loop): each task's
    query metric after 0..max_steps adaptation steps (:meth:`Learner.evaluation_curve`), tasks
    drawn ``chunk`` at a time from ``sampler`` with ``generator``."""
    fn = functools.partial(query_metric, metric)
    rows = []
    done = 0
    while done < num_tasks:
        batch = sampler.sample(min(chunk, num_tasks - done), generator).to(device)
        rows.append(learner.evaluation_curve(batch, max_steps, fn).detach().cpu())
        done += batch.num_tasks
    return torch.cat(rows)


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
