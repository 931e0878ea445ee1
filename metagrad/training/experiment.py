"""From a configuration to the pieces of an experiment: model, learners, task samplers, metric."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import nn

from metagrad.algorithms.anil import ANIL
from metagrad.algorithms.baselines import Pretrained
from metagrad.algorithms.blackbox import BlackBox
from metagrad.algorithms.cavia import CAVIA
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.maml import MAML
from metagrad.algorithms.mamlpp import MAMLpp
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.algorithms.reptile import Reptile
from metagrad.config import ExperimentConfig
from metagrad.core.taskbatch import TaskSampler
from metagrad.models.conv import miniimagenet_conv, omniglot_conv
from metagrad.models.mlp import MLP, omniglot_mlp, sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks

Learner = MAML | BlackBox
"""What the trainer trains: a gradient-based learner (the MAML family, whose evaluation takes
inner steps) or the black-box baseline (which conditions on the support set)."""


@dataclass
class Experiment:
    config: ExperimentConfig
    learners: dict[str, Learner]
    """The configured algorithm under its name (``config.algo``) and, when configured, the
    ``"pretrained"`` baseline."""
    train_tasks: TaskSampler
    tasks_for: Callable[[str, int], TaskSampler]
    """``tasks_for(split, shots)``: tasks of ``"val"`` or ``"test"`` with that many shots."""
    metric: str
    make_model: Callable[[], nn.Module]
    ways: int | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    """JSON-able records the trainer saves in the run directory (e.g. the data split)."""

    @property
    def learner(self) -> Learner:
        """The meta-learner being trained (``config.algo``)."""
        return self.learners[self.config.algo]

    def scratch_learner(self) -> MAML:
        """A freshly initialised model, fine-tuned like MAML adapts: the 'from scratch' row."""
        return make_learner(self.config, MAML, self.make_model(), self.metric)


def make_learner(cfg: ExperimentConfig, cls: type[MAML], model: nn.Module, metric: str) -> MAML:
    common: dict[str, Any] = dict(
        inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
        transductive=cfg.transductive, batching=cfg.batching, compile=cfg.compile)
    if cls in (MAML, Pretrained, Reptile, ANIL):
        common["learn_inner_lr"] = cfg.learn_inner_lr
    if cfg.checkpoint_inner_steps and cls in (MAML, MAMLpp, MetaSGD, CAVIA):
        common["checkpoint_inner_steps"] = True
    if cls is MAMLpp:
        common.update(multi_step_loss=cfg.mamlpp_multi_step_loss, msl_epochs=cfg.mamlpp_msl_epochs,
                      first_order_epochs=cfg.mamlpp_first_order_epochs,
                      learn_step_lrs=cfg.mamlpp_step_lrs,
                      per_step_bn=cfg.mamlpp_per_step_bn,
                      iterations_per_epoch=cfg.iterations_per_epoch)
    elif cls is IMAML:
        common.update(lam=cfg.imaml_lambda, cg_iterations=cfg.imaml_cg_iterations)
    elif cls is CAVIA:
        common.update(context_dim=cfg.cavia_context_dim)
    loss = F.mse_loss if metric == "mse" else F.cross_entropy
    return cls(model, loss, **common)


def make_blackbox(cfg: ExperimentConfig, model: nn.Module, metric: str) -> BlackBox:
    """The black box whose encoder is the task's model without its head (the MLP body for
    sinusoid, the Conv4 feature extractor or the MLP body for images)."""
    classes = cfg.ways if metric == "accuracy" else None
    loss = F.mse_loss if metric == "mse" else F.cross_entropy
    return BlackBox.from_model(model, loss, classes=classes, width=cfg.blackbox_width,
                               layers=cfg.blackbox_layers, heads=cfg.blackbox_heads)


ALGORITHM_CLASSES: dict[str, type[MAML] | type[BlackBox]] = {
    "maml": MAML, "metasgd": MetaSGD, "mamlpp": MAMLpp, "anil": ANIL, "reptile": Reptile,
    "imaml": IMAML, "cavia": CAVIA, "blackbox": BlackBox,
}


def _image_experiment(cfg: ExperimentConfig) -> Experiment:
    queries = cfg.eval_queries or cfg.queries
    if cfg.task == "omniglot":
        from metagrad.tasks.omniglot import OmniglotEpisodes, OmniglotSplits, load_omniglot

        data = load_omniglot(cfg.data)
        splits = OmniglotSplits.create(cfg.split, seed=cfg.seed)

        def sampler(split: str, shots: int, queries: int) -> TaskSampler:
            return OmniglotEpisodes(data, split, cfg.ways, shots, queries, cfg.rotations,
                                    splits)

        artifacts = {"split.json": splits.to_dict()}
        if cfg.model == "mlp":
            def make_model() -> nn.Module:
                return omniglot_mlp(cfg.ways)
        else:
            def make_model() -> nn.Module:
                return omniglot_conv(cfg.ways)
    else:
        from metagrad.tasks.miniimagenet import MiniImageNetEpisodes, load_miniimagenet

        def sampler(split: str, shots: int, queries: int) -> TaskSampler:
            return MiniImageNetEpisodes(load_miniimagenet(split, cfg.data), cfg.ways, shots,
                                        queries)

        artifacts = {}

        def make_model() -> nn.Module:
            return miniimagenet_conv(cfg.ways)

    cached = functools.lru_cache(maxsize=None)(lambda split, shots: sampler(split, shots, queries))
    return Experiment(cfg, {}, sampler("train", cfg.shots, cfg.queries), cached, "accuracy",
                      make_model, cfg.ways, artifacts)


def build(cfg: ExperimentConfig) -> Experiment:
    if cfg.task == "sinusoid":
        exp = Experiment(
            cfg, {}, SinusoidTasks(cfg.shots, cfg.queries),
            lambda split, shots: SinusoidTasks(shots, cfg.eval_queries or cfg.queries),
            "mse", sinusoid_mlp,
        )
    else:
        exp = _image_experiment(cfg)
    model = exp.make_model()
    # CAVIA's network also reads the context vector (sinusoid only, see config validation)
    learner_model = MLP([1 + cfg.cavia_context_dim, 40, 40, 1]) if cfg.algo == "cavia" else model
    # copied first: MAML++ with per-step BatchNorm converts its model's layers in place
    baseline_model = copy.deepcopy(model)
    cls = ALGORITHM_CLASSES[cfg.algo]
    if issubclass(cls, BlackBox):
        exp.learners[cfg.algo] = make_blackbox(cfg, copy.deepcopy(model), exp.metric)
    else:
        exp.learners[cfg.algo] = make_learner(cfg, cls, learner_model, exp.metric)
    if cfg.baseline:
        exp.learners["pretrained"] = make_learner(cfg, Pretrained, baseline_model, exp.metric)
    return exp
