"""What a task provides to the trainer (:class:`TaskSetup`), and the :class:`TaskBatch` it samples.

A task is registered in :data:`metagrad.tasks.TASKS` under a name (or named on the command line
as ``package.module:factory``). Its factory is a callable ``factory(config) -> TaskSetup``; it may
declare its own settings as a dataclass in the attribute ``Options`` (see :func:`task`), which
then appear as command-line flags and in ``config.yaml``, and reach the factory as
``config.task_options``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import torch
from torch import nn

from metagrad.core.taskbatch import TaskBatch, TaskSampler

Metric = Literal["mse", "accuracy"]
Split = Literal["train", "val", "test"]
"""A split of a task's classes (``TaskSetup.held_out`` accepts each; ``"train"``: the
meta-training classes)."""
SPLITS: tuple[Split, ...] = get_args(Split)


@dataclass
class TaskSetup:
    """Everything the trainer and the evaluator need from a task.

    ``train`` draws meta-training batches; ``held_out(split, shots)`` returns the sampler of
    ``"val"`` or ``"test"`` tasks (or ``"train"``: the meta-training classes with the held-out
    episode sizes) with ``shots`` examples per class (or per task, for regression; a task
    without class splits may return the same sampler for every split); ``metric`` is ``"mse"``
    (lower is better) or ``"accuracy"``; ``make_model()`` builds a fresh network (called for
    the learner and each baseline); ``classes`` is the number of classes per task (``None`` for
    regression); ``artifacts`` are JSON-able records saved in the run directory (e.g.
    ``{"split.json": ...}``); ``plots(learners, run_dir, shots, steps, generator)`` may draw
    task-specific figures after evaluation and return their paths."""

    train: TaskSampler
    held_out: Callable[[str, int], TaskSampler]
    metric: Metric
    make_model: Callable[[], nn.Module]
    classes: int | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    plots: Callable[[dict[str, nn.Module], Path, list[int], int, torch.Generator],
                    list[Path]] | None = None


F = TypeVar("F", bound=Callable[..., TaskSetup])


def task(options: type | None = None, presets: dict[str, dict[str, Any]] | None = None,
         default_preset: Callable[[dict[str, Any]], str | None] | None = None
         ) -> Callable[[F], F]:
    """Declares what a task factory offers beyond ``factory(config) -> TaskSetup``:

    * ``options``: a dataclass of the task's own settings (e.g. Omniglot's ``split``), read by
      the factory as ``config.task_options``;
    * ``presets``: named settings (``--preset NAME``), any shared or option field by name;
    * ``default_preset(overrides)``: the preset used when none is named, given the settings the
      user chose (e.g. the paper's 20-way settings when ``ways >= 20``); ``None``: no preset.
    """

    def mark(factory: F) -> F:
        factory.Options = options  # type: ignore[attr-defined]
        factory.presets = dict(presets or {})  # type: ignore[attr-defined]
        factory.default_preset = default_preset  # type: ignore[attr-defined]
        return factory

    return mark


__all__ = ["Metric", "TaskBatch", "TaskSampler", "TaskSetup", "task"]
