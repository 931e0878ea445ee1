"""Sinusoid regression of MAML §5.1: y = A sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π],
x ~ U[−5, 5]; each task is one (A, φ) with ``shots`` support and ``queries`` query points."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.base import TaskSetup, task


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


# --- the ``sinusoid`` task ----------------------------------------------------------------------

_RUN: dict[str, Any] = dict(shots=10, queries=10, inner_lr=0.01, inner_steps=1, meta_batch=25,
                            meta_lr=1e-3, eval_steps=10, eval_shots=[5, 10], eval_queries=100)

# MAML §5.1 (70,000 iterations) and a short run with the same settings.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(_RUN, iterations=70000),
    "quick": dict(_RUN, iterations=4000, val_every=500, checkpoint_every=500),
}


def _default_preset(overrides: dict[str, Any]) -> str:
    return "paper"


@task(presets=PRESETS, default_preset=_default_preset)
def sinusoid_task(config: Any) -> TaskSetup:
    """Sinusoid regression (MAML §5.1): ``config.shots`` support and ``config.queries`` query
    points per task for meta-training, ``config.eval_queries`` (else ``queries``) held out; the
    paper's 40-40 MLP; metric ``"mse"``. ``plots`` draws, for each number of shots, the
    predictions after 0, 1 and ``steps`` steps on the same two test functions (MAML Fig. 2)."""
    eval_queries = config.eval_queries or config.queries

    def held_out(split: str, shots: int) -> SinusoidTasks:
        return SinusoidTasks(shots, eval_queries)

    def plots(learners: dict[str, nn.Module], run_dir: Path, shots: list[int], steps: int,
              generator: torch.Generator) -> list[Path]:
        from metagrad.training.plots import plot_sinusoid_predictions  # matplotlib: on demand

        state = generator.get_state()
        return [plot_sinusoid_predictions(learners, k, run_dir / f"sinusoid_predictions_K{k}.png",
                                          torch.Generator().set_state(state),
                                          steps=tuple(sorted({0, 1, steps})))
                for k in shots]

    return TaskSetup(SinusoidTasks(config.shots, config.queries), held_out, "mse", sinusoid_mlp,
                     plots=plots)
