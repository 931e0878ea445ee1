"""From a configuration to the pieces of an experiment: the task's setup and the learners."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metagrad.algorithms.base import Learner, NoOptions
from metagrad.config import ExperimentConfig, algorithm_class, task_factory
from metagrad.core.taskbatch import LossFn
from metagrad.tasks.base import Metric, TaskSetup

PRETRAINED = "pretrained"
"""The name of the "pretrained on all tasks, then fine-tuned" baseline (Finn et al. 2017, §5.1)."""


def loss_for(metric: Metric) -> LossFn:
    """The training loss that goes with a task's metric."""
    return F.mse_loss if metric == "mse" else F.cross_entropy


@dataclass
class Experiment:
    """A configured task and its learners: ``learners[config.algo]`` and, when configured, the
    :data:`PRETRAINED` baseline, trained on the same task batches."""

    config: ExperimentConfig
    setup: TaskSetup
    learners: dict[str, Learner]
    device: torch.device

    @property
    def learner(self) -> Learner:
        """The meta-learner being trained (``config.algo``)."""
        return self.learners[self.config.algo]

    def scratch_learner(self) -> Learner:
        """A freshly initialised model, fine-tuned like MAML adapts: the 'from scratch' row."""
        return algorithm_class("maml").from_config(
            self.setup.make_model(), loss_for(self.setup.metric),
            self.config.learner_settings(self.setup.classes, self.device), NoOptions())


def build(cfg: ExperimentConfig, device: torch.device | str = "cpu") -> Experiment:
    """The task (its registered factory called with ``cfg``, whose ``device`` is then the
    resolved one) and the learners, on ``device``."""
    device = torch.device(device)
    setup = task_factory(cfg.task)(dataclasses.replace(cfg, device=str(device)))
    model = setup.make_model()
    # copied first: an algorithm may change its model in place (MAML++'s per-step BatchNorm)
    baseline_model = copy.deepcopy(model)
    loss = loss_for(setup.metric)
    settings = cfg.learner_settings(setup.classes, device)
    learners = {cfg.algo: algorithm_class(cfg.algo).from_config(model, loss, settings,
                                                                cfg.algo_options)}
    if cfg.baseline:
        plain = dataclasses.replace(settings, compile=False, checkpoint_inner_steps=False)
        learners[PRETRAINED] = algorithm_class(PRETRAINED).from_config(
            baseline_model, loss, plain, NoOptions())
    return Experiment(cfg, setup, learners, device)
