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

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from metagrad.core.taskbatch import LossFn, TaskBatch
from metagrad.errors import ConfigError

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
    precision: bool = True
    """Accepts a ``precision`` other than ``"fp32"`` (its forward passes are
    :meth:`~metagrad.algorithms.maml.MAML.functional_forward`, which runs them under
    autocast)."""
    memory_format: bool = True
    """Accepts a ``memory_format`` other than ``"auto"`` (its forward passes are
    :meth:`~metagrad.algorithms.maml.MAML.functional_forward`, which lays out their inputs)."""

    def refused(self, settings: LearnerSettings) -> list[str]:
        """The shared settings that differ from their defaults but that this algorithm cannot
        use (``inner_lr``/``inner_steps`` are not checked: presets set them)."""
        default = LearnerSettings()
        return [name for name in ("first_order", "learn_inner_lr", "compile",
                                  "checkpoint_inner_steps", "batching", "transductive",
                                  "precision", "memory_format")
                if not getattr(self, name) and getattr(settings, name) != getattr(default, name)]

    def check(self, settings: LearnerSettings, algorithm: str) -> None:
        """Raises a :class:`~metagrad.errors.ConfigError` naming every setting in
        :meth:`refused`."""
        refused = self.refused(settings)
        if refused:
            raise ConfigError(
                f"{algorithm} cannot use " + ", ".join(
                    f"{name}={getattr(settings, name)!r}" for name in refused)
                + ": " + "; ".join(f"{name}: {_CAPABILITY_HELP[name]}" for name in refused)
                + "; remove " + ("it" if len(refused) == 1 else "them"))

    def applicable(self, settings: LearnerSettings) -> LearnerSettings:
        """``settings`` with the refused ones reset to their defaults: for a baseline built
        beside the chosen algorithm from the same settings (e.g. ``Pretrained``)."""
        default = LearnerSettings()
        return dataclasses.replace(settings, **{n: getattr(default, n)
                                                for n in self.refused(settings)})


_CAPABILITY_HELP = {
    "first_order": "the algorithm fixes its derivative order itself",
    "learn_inner_lr": "the algorithm fixes how its inner rates are set or learned",
    "compile": "its meta-gradient is not one differentiable loss to compile",
    "checkpoint_inner_steps": "it keeps no second-order inner graph worth recomputing",
    "batching": "it has no per-task inner loop to batch",
    "transductive": "it has no inner-loop BatchNorm policy",
    "precision": "its forward passes do not run under the mixed-precision policy",
    "memory_format": "its forward passes do not follow the memory-layout policy",
}


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
    precision: str = "fp32"
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA): :mod:`metagrad.core.precision`."""
    memory_format: str = "auto"
    """``"auto"``, ``"channels_last"`` or ``"contiguous"``: :mod:`metagrad.core.layout`."""
    classes: int | None = None
    """Classes per task (classification), ``None`` for regression."""
    device: torch.device | str = "cpu"


@dataclass
class NoOptions:
    """The options of an algorithm that has none."""


OptionsT = TypeVar("OptionsT")


def resolve_options(options_class: type[OptionsT], options: OptionsT | None) -> OptionsT:
    """``options``, or the defaults when ``None``; refuses options of another algorithm."""
    if options is None:
        return options_class()
    if not isinstance(options, options_class):
        raise ConfigError(f"expected {options_class.__name__}, got {type(options).__name__}")
    return options


def require_integer(name: str, value: object, minimum: int) -> None:
    """An option that must be an integer ``>= minimum`` (``ConfigError`` naming it otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def require_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    """An option that must be a finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def measured_steps(at: Sequence[int] | None, max_steps: int) -> list[int]:
    """The numbers of adaptation steps an evaluation curve measures: ``at`` (strictly
    increasing integers in 0..``max_steps``), or every one of 0..``max_steps`` when ``None``.
    Raises :class:`ConfigError` otherwise."""
    if at is None:
        return list(range(max_steps + 1))
    steps = list(at)
    if (not steps or any(not isinstance(k, int) or isinstance(k, bool) for k in steps)
            or steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] > max_steps):
        raise ConfigError(f"the steps to measure at must be strictly increasing integers "
                          f"between 0 and the largest number of steps ({max_steps}), got {at!r}")
    return steps


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

    def evaluation_curve(self, batch: TaskBatch, max_steps: int, metric: MetricFn,
                         at: Sequence[int] | None = None) -> Tensor:
        """``[tasks, len(at)]``: the query metric of each task of ``batch`` after each number of
        adaptation steps in ``at`` (:func:`measured_steps`; default 0, 1, …, ``max_steps``),
        without touching the learner's parameters or buffers; ``[tasks, 1]`` for a learner
        without an inner loop (its metric after conditioning on the support set)."""
        ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False
                        ) -> Any: ...
