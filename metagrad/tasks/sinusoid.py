"""Sinusoid regression of MAML §5.1: y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
x ~ U[−5, 5]; each task is one (A, φ) with ``shots`` support and ``queries`` query points."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError


@dataclass(frozen=True)
class SinusoidTasks:
    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        if self.shots < 1 or self.queries < 1:
            raise ConfigError(f"sinusoid tasks need shots >= 1 and queries >= 1, got "
                              f"shots={self.shots}, queries={self.queries}")

    def sample_functions(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases, each ``[num_tasks]``."""
        amp = _uniform(self.amplitude, (num_tasks,), generator)
        phase = _uniform(self.phase, (num_tasks,), generator)
        return amp, phase

    @staticmethod
    def evaluate(amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """y = A sin(x − φ) for inputs ``x`` of shape ``[tasks, n, 1]``."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        amp, phase = self.sample_functions(num_tasks, generator)
        return self.batch_for(amp, phase, generator)

    def batch_for(self, amplitude: Tensor, phase: Tensor, generator: torch.Generator) -> TaskBatch:
        n = amplitude.shape[0]
        sx = _uniform(self.x_range, (n, self.shots, 1), generator)
        qx = _uniform(self.x_range, (n, self.queries, 1), generator)
        return TaskBatch(sx, self.evaluate(amplitude, phase, sx), qx,
                         self.evaluate(amplitude, phase, qx))


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...],
             generator: torch.Generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low
