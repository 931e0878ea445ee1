"""From a configuration to the pieces of an experiment: model, learners, task samplers, metric."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from metagrad.algorithms.baselines import Pretrained
from metagrad.algorithms.maml import MAML
from metagrad.config import ExperimentConfig
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.base import TaskSampler
from metagrad.tasks.sinusoid import SinusoidTasks


@dataclass
class Experiment:
    config: ExperimentConfig
    learners: dict[str, MAML]
    """``"maml"`` and, when configured, the ``"pretrained"`` baseline."""
    train_tasks: TaskSampler
    tasks_for: Callable[[str, int], TaskSampler]
    """``tasks_for(split, shots)``: tasks of ``"val"`` or ``"test"`` with that many shots."""
    metric: str
    make_model: Callable[[], nn.Module]
    ways: int | None = None

    def scratch_learner(self) -> MAML:
        """A freshly initialised model, fine-tuned like the others: the 'from scratch' row."""
        return self._learner(MAML, self.make_model())

    def _learner(self, cls: type[MAML], model: nn.Module) -> MAML:
        cfg = self.config
        return cls(model, F.mse_loss if self.metric == "mse" else F.cross_entropy,
                   inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                   first_order=cfg.first_order, learn_inner_lr=cfg.learn_inner_lr,
                   transductive=cfg.transductive, batching=cfg.batching)  # type: ignore[arg-type]


def build(cfg: ExperimentConfig) -> Experiment:
    if cfg.task == "sinusoid":
        exp = Experiment(
            cfg, {}, SinusoidTasks(cfg.shots, cfg.queries),
            lambda split, shots: SinusoidTasks(shots, cfg.eval_queries or cfg.queries),
            "mse", sinusoid_mlp,
        )
    else:  # validated by ExperimentConfig
        raise NotImplementedError(cfg.task)
    model = exp.make_model()
    exp.learners["maml"] = exp._learner(MAML, model)
    if cfg.baseline:
        exp.learners["pretrained"] = exp._learner(Pretrained, copy.deepcopy(model))
    return exp
