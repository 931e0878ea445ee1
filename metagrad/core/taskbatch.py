"""A batch of few-shot tasks as tensors with a leading task dimension, and its checks.

Every task source (sinusoid regression, Omniglot / MiniImageNet episodes, a user's own data set)
produces a :class:`TaskBatch`; every algorithm consumes one. Task ``i`` is
``(support_x[i], support_y[i], query_x[i], query_y[i])``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metagrad.errors import ConfigError

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``)."""


@dataclass(frozen=True)
class TaskBatch:
    """``support_x``: ``[tasks, n_support, *x_shape]``; ``query_x``: ``[tasks, n_query, *x_shape]``;
    targets likewise."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        n = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"TaskBatch: {name} has {getattr(self, name).shape[0]} tasks but support_x "
                    f"has {n}; every tensor needs the same leading task dimension"
                )

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int | slice | Tensor) -> TaskBatch:
        """Tasks selected along the leading dimension (an int keeps a task dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TaskBatch(
            self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index]
        )

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TaskBatch:
        """Moves the tensors; ``dtype`` applies to floating-point tensors only."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TaskBatch(*(move(t) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y


class TaskSampler(Protocol):
    """Anything that draws a :class:`TaskBatch` of ``num_tasks`` tasks from a generator."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


def check_pair(x: Tensor, y: Tensor, which: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ConfigError(f"{which} inputs and targets must be tensors")
    if x.shape[:1] != y.shape[:1]:
        raise ConfigError(
            f"{which} set: {x.shape[0] if x.dim() else 'a scalar'} inputs but "
            f"{y.shape[0] if y.dim() else 'a scalar'} targets; each input needs one target "
            f"(inputs {tuple(x.shape)}, targets {tuple(y.shape)})"
        )


def check_task_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor,
                     query_y: Tensor) -> None:
    """Clear errors for the mistakes seen in practice: a missing task dimension, tasks that do not
    line up, support and query examples of different shapes."""
    tensors = {"support_x": support_x, "support_y": support_y, "query_x": query_x,
               "query_y": query_y}
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ConfigError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ConfigError(
                f"{name} has shape {tuple(t.shape)}: expected a leading task dimension and an "
                "example dimension, [tasks, examples, ...]; for one task use adapt() or add "
                "a task dimension with .unsqueeze(0)"
            )
    counts = {name: t.shape[0] for name, t in tensors.items()}
    if min(counts.values()) == 0:
        raise ConfigError("the task batch is empty: " + ", ".join(
            f"{k} has {v} tasks" for k, v in counts.items()) + "; sample at least one task")
    if len(set(counts.values())) != 1:
        raise ConfigError(
            "mismatched task dimensions: " + ", ".join(f"{k} has {v}" for k, v in counts.items())
            + " tasks; all four need the same leading task dimension"
        )
    check_pair(support_x[0], support_y[0], "support")
    check_pair(query_x[0], query_y[0], "query")
    for name in ("support_x", "query_x"):
        if tensors[name].shape[1] == 0:
            raise ConfigError(f"{name} has no examples (shape {tuple(tensors[name].shape)}); "
                              "each task needs at least one support and one query example")
    if support_x.shape[2:] != query_x.shape[2:]:
        raise ConfigError(
            f"support and query examples differ in shape: support_x {tuple(support_x.shape)} vs "
            f"query_x {tuple(query_x.shape)} (dimensions after [tasks, examples] must match)"
        )
    if support_y.shape[2:] != query_y.shape[2:]:
        raise ConfigError(
            f"support and query targets differ in shape: support_y {tuple(support_y.shape)} vs "
            f"query_y {tuple(query_y.shape)}"
        )

