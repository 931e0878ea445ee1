"""Meta-test evaluation as papers report it: the query metric after 0, 1, …, N adaptation steps,
mean and 95% confidence interval (1.96·s/√n) over n held-out tasks.

A learner without an inner loop (the black-box baseline) has one column, reported at 0 steps
(its metric after conditioning on the support set), never repeated as rows for 1..N steps.

The baselines fine-tune with a step size of their own (:func:`tune_fine_tuning`), chosen on
validation tasks among :data:`FINE_TUNE_SCALES` × ``inner_lr``: the α a meta-learner was trained
with is no fair step size for a network that was not."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from metagrad.algorithms.base import Learner, measured_steps
from metagrad.algorithms.maml import MAML
from metagrad.core.taskbatch import TaskSampler
from metagrad.errors import ConfigError

METRICS = ("mse", "accuracy")

FINE_TUNE_SCALES = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)
"""Multiples of the configured inner step size among which each baseline's fine-tuning step
size is chosen on the validation tasks (supervised and meta-RL)."""


def resolve_eval_seed(configured: int, override: int | None) -> int:
    """The seed of an evaluation's test tasks: ``override`` (``--eval-seed``) if given, else the
    run's ``eval_seed``."""
    if override is None:
        return configured
    if isinstance(override, bool) or not isinstance(override, int) or override < 0:
        raise ConfigError(f"--eval-seed must be an integer >= 0, got {override!r}")
    return override


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
                      device: torch.device | str = "cpu", chunk: int = 50,
                      at: Sequence[int] | None = None) -> Tensor:
    """``[num_tasks, len(curve_steps(learner, max_steps, at))]``: each task's query metric after
    each number of adaptation steps in ``at`` (default 0..max_steps;
    :meth:`Learner.evaluation_curve`), tasks drawn ``chunk`` at a time from ``sampler`` with
    ``generator``."""
    fn = functools.partial(query_metric, metric)
    rows = []
    done = 0
    while done < num_tasks:
        batch = sampler.sample(min(chunk, num_tasks - done), generator).to(device)
        rows.append(learner.evaluation_curve(batch, max_steps, fn, at).detach().cpu())
        done += batch.num_tasks
    return torch.cat(rows)


def curve_steps(learner: Learner, max_steps: int, at: Sequence[int] | None = None) -> list[int]:
    """The numbers of steps that label the columns of ``learner``'s evaluation curves: ``at``
    (default 0..``max_steps``), or ``[0]`` for a learner without an inner loop."""
    return measured_steps(at, max_steps) if learner.capabilities.inner_loop else [0]


def tune_fine_tuning(learner: MAML, sampler: TaskSampler, num_tasks: int, steps: int,
                     metric: str, seed: int, device: torch.device | str = "cpu") -> MAML:
    """A copy of ``learner`` whose ``inner_lr`` is the one among :data:`FINE_TUNE_SCALES` ×
    ``learner.inner_lr`` with the best mean query ``metric`` after ``steps`` adaptation steps
    on ``num_tasks`` tasks of ``sampler`` (drawn with ``seed``: every candidate meets the same
    tasks). Lower is better for ``"mse"``, higher for ``"accuracy"``; a non-finite metric is the
    worst; among equal metrics the smaller step size wins. The copy fine-tunes with that one
    fixed step size: inner rates of ``learner`` (``learn_inner_lr``, set for an untrained
    "scratch" network) are dropped. ``learner`` is not modified, and is returned itself when
    ``steps`` is 0 (no step is taken: there is nothing to choose)."""
    if steps == 0:
        return learner
    sign = -1.0 if metric == "mse" else 1.0

    def candidate(scale: float) -> tuple[float, float, MAML]:
        tuned = copy.deepcopy(learner)
        tuned.inner_lr = learner.inner_lr * scale
        tuned.inner_rates = None
        curves = evaluation_curves(tuned, sampler, num_tasks, steps, metric,
                                   torch.Generator().manual_seed(seed), device, at=[steps])
        score = sign * curves[:, -1].mean().item()
        return (score if math.isfinite(score) else -math.inf, -scale, tuned)

    return max(map(candidate, FINE_TUNE_SCALES), key=lambda c: c[:2])[2]


@dataclass
class EvalRow:
    """One row of ``eval.json``. ``gain_ci95``: the half-width of the paired 95% interval of the
    per-task change since 0 steps (this row's metric minus the same task's at 0 steps; its mean
    is ``mean`` minus the 0-step row's). When tasks differ more than adaptation changes any one
    of them, this interval is much narrower than the two rows' own intervals together; it is the
    one that says whether adaptation helped."""

    method: str
    shots: int
    steps: int
    mean: float
    ci95: float
    tasks: int
    split: str
    ways: int | None = None
    gain_ci95: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("ways", "gain_ci95")}


def rows_from_curves(curves: Tensor, method: str, shots: int, split: str,
                     ways: int | None = None, steps: Sequence[int] | None = None
                     ) -> list[EvalRow]:
    """One row per column of ``curves`` (``[tasks, columns]``), column i labelled ``steps[i]``
    (default: i); when column 0 is 0 steps, each later row has its paired ``gain_ci95``."""
    steps = list(range(curves.shape[1]) if steps is None else steps)
    if len(steps) != curves.shape[1]:
        raise ValueError(f"{len(steps)} step labels for {curves.shape[1]} columns")
    return [
        EvalRow(method, shots, step, *mean_ci95(curves[:, i]), curves.shape[0], split, ways,
                mean_ci95(curves[:, i] - curves[:, 0])[1] if i > 0 and steps[0] == 0 else None)
        for i, step in enumerate(steps)
    ]
