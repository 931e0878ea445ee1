"""BatchNorm written in plain differentiable tensor ops, for exact second order under ``vmap``.

On torch 2.13 (CPU), second-order gradients through the native ``batch_norm`` kernel under
``vmap`` are wrong (see :mod:`metagrad.core.batching`). The same function written with ``mean``,
subtraction, multiplication and ``rsqrt`` has only ops whose batching rules are exact in any
derivative order, so a model whose BatchNorm layers are switched to it can be vmapped over tasks
in second order, and its per-task convolutions become batched (grouped) ones.

Only the *batch-statistics* path is replaced (what MAML's adaptation, and transductive queries,
use): a layer that would read or write its running statistics keeps its native forward.

Numerics: two passes (mean first, then the mean of squared deviations), the biased variance that
``F.batch_norm`` normalises with, and ``rsqrt(var + eps)``; in float64 it matches
``F.batch_norm`` to rounding, in float32 to ~1e-6 relative.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_MISSING = object()


def batch_norm_batch_statistics(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                                eps: float) -> Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` in plain tensor ops.

    ``x`` is ``[N, C, *]``; statistics are taken over every dimension but the channel one."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    out = centred * (var + eps).rsqrt()
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _uses_batch_statistics_only(module: _BatchNorm) -> bool:
    """True when the native forward would normalise with the batch's statistics and neither read
    nor update running statistics (the logic of ``_BatchNorm.forward``)."""
    if module.training:
        return not module.track_running_stats
    return module.running_mean is None and module.running_var is None


def _forward(self: _BatchNorm, x: Tensor) -> Tensor:
    if not _uses_batch_statistics_only(self):
        return type(self).forward(self, x)
    self._check_input_dim(x)
    # layers with several affine pairs (PerStepBatchNorm) say which one is in use
    affine_at_step = getattr(self, "affine_at_step", None)
    weight, bias = affine_at_step() if affine_at_step is not None else (self.weight, self.bias)
    return batch_norm_batch_statistics(x, weight, bias, self.eps)


@contextlib.contextmanager
def batch_norm_as_tensor_ops(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``_BatchNorm`` layer of ``model`` that normalises with batch
    statistics only (train mode with ``track_running_stats=False``, as inside
    :func:`metagrad.core.functional.batch_norm_uses_batch_statistics`, or no running buffers)
    computes :func:`batch_norm_batch_statistics` instead of the native kernel. Layers that use
    running statistics are unaffected. The layers' own ``forward`` is restored on exit.

    Only instance attributes are set (``layer.forward``), so ``functional_call`` and parameter
    swapping work as usual; nesting is allowed.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = types.MethodType(_forward, module)
    try:
        yield model
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
