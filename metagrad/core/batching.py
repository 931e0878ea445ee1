"""Meta-loss over a batch of tasks: ``vmap`` where it is known to give the same result as a
per-task loop, the loop otherwise.

Why not always ``vmap``: on torch 2.13 (CPU), differentiating *twice* through the native
``batch_norm`` / ``layer_norm`` kernels under ``vmap`` returns a wrong meta-gradient for the
parameters feeding the normalisation. First-order gradients through them are correct. Some
modules (``nn.LSTM``) cannot be vmapped at all. So the automatic choice batches only models built
from layers whose vmap rule is verified for the derivative order in use (the test suite checks
each against the loop), and falls back to the loop on any vmap error; forcing ``"vmap"`` on a
model with any other layer is refused (:func:`require_vmap_exact`) rather than risk a wrong
meta-gradient. BatchNorm is made exact in second order by running it, under vmap, as plain tensor
ops (:mod:`metagrad.core.fast_norm`).

``"auto"`` takes vmap for exact models, except convolutional ones on tasks of more than
:data:`CONV_VMAP_MAX_EXAMPLES` examples: vmapped, per-task conv weights become grouped
convolutions, which beat a loop of small per-task convolutions but lose to a loop of large ones
(see BENCHMARKS.md, "Batching conv nets").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import vmap

from metagrad.core.fast_norm import batch_norm_as_tensor_ops
from metagrad.core.per_step_norm import PerStepBatchNorm
from metagrad.core.taskbatch import Inputs, task_slices
from metagrad.errors import ConfigError

Batching = Literal["auto", "vmap", "loop"]
T = TypeVar("T")

ELEMENTWISE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Identity, nn.Flatten,
)
# Each entry is checked against the per-task loop by tests/core/test_any_module.py.
_VERIFIED_SECOND_ORDER = (
    nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.GroupNorm,
    nn.BatchNorm1d, nn.BatchNorm2d,  # as plain tensor ops under vmap (fast_norm)
    *ELEMENTWISE_LAYERS,
)
_VERIFIED_FIRST_ORDER_ONLY = (nn.LayerNorm, nn.InstanceNorm2d)
# Exact when forced (tests/algorithms/test_per_step_bn.py), not chosen by "auto".
_VERIFIED_WHEN_FORCED = (PerStepBatchNorm,)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_VMAP_MAX_EXAMPLES = 20
"""Examples per task (support + query) up to which ``"auto"`` vmaps a conv net's tasks."""


def _module_is_verified(module: nn.Module, first_order: bool) -> bool:
    allowed = _VERIFIED_SECOND_ORDER + (_VERIFIED_FIRST_ORDER_ONLY if first_order else ())
    if type(module) in allowed or getattr(module, "vmap_exact_forward", False):
        return True
    # A container whose forward is nn.Sequential's (subclasses included) only chains its children.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def vmap_is_exact(model: nn.Module, first_order: bool) -> bool:
    """True when every submodule of ``model`` is a layer whose vmap rule is verified for this
    derivative order. Custom modules with their own ``forward`` are not (they may call anything),
    unless their class sets ``vmap_exact_forward = True``: a promise that their own forward code
    uses only ops that batch exactly (elementwise, reshaping, reductions, matmul); their
    submodules are still checked one by one."""
    return all(_module_is_verified(m, first_order) for m in model.modules())


def require_vmap_exact(model: nn.Module, first_order: bool) -> None:
    """Raises a :class:`ConfigError` naming the first layer of ``model`` whose vmap rule is not
    verified for this derivative order (``batching="vmap"`` could return a wrong
    meta-gradient through it).

    Layers are the modules without submodules (where the kernels run); the own code of a
    container (e.g. a model's ``forward`` chaining its layers) is trusted when vmap is forced."""
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or type(module) in _VERIFIED_WHEN_FORCED \
                or _module_is_verified(module, first_order):
            continue
        order = "first" if first_order else "second"
        raise ConfigError(
            f"batching='vmap' is not verified exact in {order} order for layer "
            f"{name or '(the model itself)'!r} ({type(module).__name__}): vmap could return a "
            "wrong meta-gradient through it; use batching='auto' (vmap only where verified, "
            "otherwise a per-task loop) or batching='loop'. A custom module whose own forward "
            "uses only ops that batch exactly may declare vmap_exact_forward = True")


def examples_per_task(tasks: tuple[Inputs, ...]) -> int:
    """Support + query examples of one task of ``(support_x, support_y, query_x, query_y)``
    (read from the targets, whose dimension 1 counts examples); 0 for any other layout."""
    if len(tasks) != 4:
        return 0
    return sum(t.shape[1] for t in (tasks[1], tasks[3])
               if isinstance(t, torch.Tensor) and t.dim() >= 2)


def use_vmap(batching: Batching, model: nn.Module, first_order: bool,
             examples: int | None = None) -> bool:
    """The batching decision: forced (refused where not verified exact, see
    :func:`require_vmap_exact`), or ``"auto"`` = exact, and for a model with convolutions only
    when each task has at most :data:`CONV_VMAP_MAX_EXAMPLES` ``examples`` (unknown: loop)."""
    if batching != "auto":
        if batching == "vmap":
            require_vmap_exact(model, first_order)
        return batching == "vmap"
    if not vmap_is_exact(model, first_order):
        return False
    small = examples is not None and 0 < examples <= CONV_VMAP_MAX_EXAMPLES
    return small or not any(isinstance(m, _CONVOLUTIONS) for m in model.modules())


def per_task(task_fn: Callable[..., T], tasks: tuple[Inputs, ...], batching: Batching,
             model: nn.Module, first_order: bool) -> T:
    """``task_fn(*task_i)`` for every task i, stacked along a new leading dimension, computed by
    vmap or by a loop (see module doc).

    Each element of ``tasks`` has a leading task dimension (a tensor, or a tuple or dict of
    tensors, :data:`~metagrad.core.taskbatch.Inputs`). ``task_fn`` returns a tensor or any
    nesting of tuples and dicts of tensors (e.g. ``(gradients, loss)``), each stacked."""
    if use_vmap(batching, model, first_order, examples_per_task(tasks)):
        try:
            with batch_norm_as_tensor_ops(model):
                return vmap(task_fn, randomness="different")(*tasks)
        except RuntimeError:
            if batching == "vmap":
                raise
    outputs: list[Any] = [task_fn(*task) for task in task_slices(tasks)]
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), outputs[0], *outputs[1:])
