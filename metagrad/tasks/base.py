"""A batch of few-shot tasks as tensors with a leading task dimension.

Every task source in metagrad (sinusoid regression, Omniglot / MiniImageNet episodes, ...)
produces a :class:`TaskBatch`; every algorithm consumes one. Task ``i`` is
``(support_x[i], support_y[i], query_x[i], query_y[i])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


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
