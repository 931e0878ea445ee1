"""Meta-loss over a batch of tasks: ``vmap`` where it is known to give the same result as a
per-task loop and is faster, the loop otherwise.

Why not always ``vmap``: on torch 2.13 (CPU), differentiating *twice* through the native
``batch_norm`` / ``layer_norm`` kernels under ``vmap`` returns a wrong meta-gradient for the
parameters feeding the normalisation (measured in float64: a conv bias before BatchNorm, whose true
gradient is 0, came out as 9e-2; LayerNorm and InstanceNorm are off by up to 2e-2). First-order
gradients through them are correct. Some modules (``nn.LSTM``) cannot be vmapped at all. So the
automatic choice batches only models built from layers whose second-order vmap rule is verified
(the test suite checks each against the loop), and falls back to the loop on any vmap error.
BatchNorm is made exact in second order by running it, under vmap, as plain tensor ops
(:mod:`metagrad.core.fast_norm`).

Speed (benchmarks/bench_peers.py, 2-core CPU): vmap is 6-7× faster than the loop on MLPs (with or
without BatchNorm) but 1.9-2.7× *slower* on the Omniglot conv nets, whose per-task weights become
grouped convolutions. ``"auto"`` therefore takes vmap only for exact models without
convolutions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import vmap

from metagrad.core.fast_norm import batch_norm_as_tensor_ops

Batching = Literal["auto", "vmap", "loop"]
T = TypeVar("T", Tensor, dict[str, Tensor])

_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Identity, nn.Flatten,
)
# Each entry is checked against the per-task loop by tests/core/test_any_module.py.
_VERIFIED_SECOND_ORDER = (
    nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.GroupNorm,
    nn.BatchNorm1d, nn.BatchNorm2d,  # as plain tensor ops under vmap (fast_norm)
    *_ELEMENTWISE,
)
_VERIFIED_FIRST_ORDER_ONLY = (nn.LayerNorm, nn.InstanceNorm2d)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

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


def use_vmap(batching: Batching, model: nn.Module, first_order: bool) -> bool:
    """The batching decision: forced, or ``"auto"`` = exact and no convolutions (see above)."""
    if batching != "auto":
        return batching == "vmap"
    return vmap_is_exact(model, first_order) and not any(
        isinstance(m, _CONVOLUTIONS) for m in model.modules())


def per_task(task_fn: Callable[..., T], tasks: tuple[Tensor, ...], batching: Batching,
             model: nn.Module, first_order: bool) -> T:
    """``stack([task_fn(*task_i) for task i])`` computed by vmap or by a loop (see module doc);
    ``task_fn`` returns a tensor or a dict of tensors (stacked per key)."""
    if use_vmap(batching, model, first_order):
        try:
            with batch_norm_as_tensor_ops(model):
                return vmap(task_fn, randomness="different")(*tasks)
        except RuntimeError:
            if batching == "vmap":
                raise
    outputs = [task_fn(*task) for task in zip(*tasks, strict=True)]
    if isinstance(outputs[0], dict):
        return {k: torch.stack([o[k] for o in outputs]) for k in outputs[0]}  # type: ignore[return-value]
    return torch.stack(outputs)  # type: ignore[arg-type]
