"""The learner protocol: what a trainer and an evaluator call on any meta-learner, and how an
algorithm declares its settings, its capabilities and its construction.

An algorithm is one file: a class implementing :class:`Learner` (usually by subclassing
:class:`~metagrad.algorithms.maml.MAML`) that declares

* ``Options``: a dataclass of its own settings (flat names, e.g. ``imaml_lambda``), shown as
  command-line flags and stored in ``config.yaml`` when the algorithm is chosen;
* ``capabilities``: a :class:`Capabilities` saying which shared settings it can use, so that the
  configuration refuses (never silently drops) the others;
* ``from_config(model, loss_fn, settings, options)``: how it is built from the shared
  :class:`LearnerSettings` and its ``Options``;

and one registry line in :data:`metagrad.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from metagrad.core.taskbatch import LossFn, TaskBatch

MetricFn = Callable[[Tensor, Tensor], Tensor]
"""``metric(output, target) -> scalar`` for one task's queries (accuracy or MSE)."""


@dataclass(frozen=True)
class Capabilities:
    """Which shared settings an algorithm can use; the configuration refuses a setting whose
    capability is ``False`` when it differs from its default (with the algorithm's name)."""

    inner_loop: bool = True
    """Takes gradient steps on the support set (``False``: conditions on it, like the black box;
    evaluated at 0 steps only, and ``inner_lr``/``inner_steps`` do not apply)."""
    first_order: bool = True
    """Accepts ``first_order`` (the first-order approximation of the meta-gradient)."""
    learn_inner_lr: bool = True
    """Accepts ``learn_inner_lr`` (Meta-SGD's learned per-parameter rates)."""
    compile: bool = False
    """Accepts ``compile`` (the meta-gradient is one differentiable loss)."""
    checkpoint_inner_steps: bool = False
    """Accepts ``checkpoint_inner_steps`` (second-order inner graphs worth recomputing)."""
    batching: bool = True
    """Accepts a ``batching`` choice other than ``"auto"`` (tasks vmapped or looped)."""
    transductive: bool = True
    """Accepts ``transductive`` (the BatchNorm policy of the inner loop)."""


@dataclass(frozen=True)
class LearnerSettings:
    """The shared settings every algorithm is built from (a view of the run's configuration)."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    learn_inner_lr: bool = False
    transductive: bool = True
    batching: str = "auto"
    compile: bool = False
    checkpoint_inner_steps: bool = False
    classes: int | None = None
    """Classes per task (classification), ``None`` for regression."""
    device: torch.device | str = "cpu"


@dataclass
class NoOptions:
    """The options of an algorithm that has none."""


@runtime_checkable
class Learner(Protocol):
    """What the trainer and the evaluator call. Learners are ``nn.Module`` s: ``parameters()``
    are what the outer optimizer updates, ``state_dict()`` is what a checkpoint stores,
    ``train()``/``eval()`` switch the mode."""

    Options: ClassVar[type]
    capabilities: ClassVar[Capabilities]

    @classmethod
    def from_config(cls, model: nn.Module, loss_fn: LossFn, settings: LearnerSettings,
                    options: Any) -> Learner:
        """The learner for ``model`` built from shared settings and its own ``options``."""
        ...

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        """Accumulates the meta-gradient of one task batch into ``.grad`` of ``parameters()``
        and returns the batch's mean (query) loss, detached."""
        ...

    def evaluation_curve(self, batch: TaskBatch, max_steps: int, metric: MetricFn) -> Tensor:
        """``[tasks, max_steps + 1]``: the query metric of each task of ``batch`` after 0, 1, …,
        ``max_steps`` adaptation steps, without touching the learner's parameters or buffers;
        ``[tasks, 1]`` for a learner without an inner loop (its metric after conditioning on the
        support set)."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False
                        ) -> Any: ...
