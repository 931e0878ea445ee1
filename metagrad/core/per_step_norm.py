"""Per-step BatchNorm (MAML++, Antoniou et al. 2019, §4 "BNWB" and "BNRS").

:class:`PerStepBatchNorm` holds one affine pair (γ, β) and one pair of running statistics per
inner step: ``weight``/``bias``/``running_mean``/``running_var`` of shape ``[slots, C]``. The
learner tells each layer which step it serves by setting its ``step`` attribute before a forward
(:meth:`metagrad.MAML.functional_forward` does it); the layer then behaves exactly like the
ordinary BatchNorm built from row ``min(step, slots - 1)`` of each tensor (``step=None``: the last
row). The convention is that the parameters θ'ₖ after k inner steps are evaluated with slot k:
the support forward of step k+1 (at θ'ₖ) and the query forward after k steps both use slot k.

It is a ``_BatchNorm`` subclass, so the transductive switch
(:func:`metagrad.core.functional.batch_norm_uses_batch_statistics`) and the train/eval logic of
torch's BatchNorm apply unchanged; running statistics of slot k are updated in place, as torch
updates its buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

_INPUT_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,)}


class PerStepBatchNorm(_BatchNorm):
    """BatchNorm1d/2d with ``slots`` sets of affine parameters and running statistics.

    Build it with :meth:`from_batch_norm` (or :func:`per_step_batch_norm` for a whole model)."""

    def __init__(self, num_features: int, slots: int, input_dims: tuple[int, ...] = (2, 3, 4),
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self.slots = slots
        self.input_dims = tuple(input_dims)
        self.step: int | None = None
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(self.weight.detach().repeat(slots, 1))
            self.bias = nn.Parameter(self.bias.detach().repeat(slots, 1))
        if track_running_stats:
            self.running_mean = self.running_mean.repeat(slots, 1)
            self.running_var = self.running_var.repeat(slots, 1)
            self.num_batches_tracked = torch.zeros(slots, dtype=torch.long, device=device)

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, slots: int) -> PerStepBatchNorm:
        """A per-step copy of ``bn``: every slot starts as ``bn``'s parameters and statistics."""
        if type(bn) not in _INPUT_DIMS:
            raise TypeError(f"expected nn.BatchNorm1d or nn.BatchNorm2d, got {type(bn).__name__}")
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(bn.num_features, slots, _INPUT_DIMS[type(bn)], bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats,
                  device=None if ref is None else ref.device,
                  dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight.detach().expand_as(new.weight))
                new.bias.copy_(bn.bias.detach().expand_as(new.bias))
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.expand_as(new.running_mean))
                new.running_var.copy_(bn.running_var.expand_as(new.running_var))
                new.num_batches_tracked.fill_(int(bn.num_batches_tracked))
        new.train(bn.training)
        return new

    @property
    def slot(self) -> int:
        """The row in use: ``min(step, slots - 1)``, the last one when ``step`` is None."""
        if self.step is None:
            return self.slots - 1
        return min(int(self.step), self.slots - 1)

    def affine_at_step(self) -> tuple[Tensor | None, Tensor | None]:
        """γ and β of the current slot (``None`` without affine parameters)."""
        k = self.slot
        return (None if self.weight is None else self.weight[k],
                None if self.bias is None else self.bias[k])

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self.input_dims:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self.input_dims)} input "
                             f"(got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        # the logic of torch's _BatchNorm.forward, on row k of every tensor
        self._check_input_dim(x)
        k = self.slot
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked[k].add_(1)
            factor = (1.0 / float(self.num_batches_tracked[k]) if self.momentum is None
                      else self.momentum)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        read_running = not self.training or self.track_running_stats
        mean = self.running_mean[k] if self.running_mean is not None and read_running else None
        var = self.running_var[k] if self.running_var is not None and read_running else None
        weight, bias = self.affine_at_step()
        return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.slots}"


def per_step_batch_norm(model: nn.Module, slots: int) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` of ``model`` (in place, recursively)
    by a :class:`PerStepBatchNorm` with ``slots`` slots; returns ``model``."""
    if type(model) in _INPUT_DIMS:
        return PerStepBatchNorm.from_batch_norm(model, slots)
    _replace(model, slots, {})
    return model


def _replace(module: nn.Module, slots: int, done: dict[int, PerStepBatchNorm]) -> None:
    for name, child in list(module.named_children()):
        if type(child) in _INPUT_DIMS:
            if id(child) not in done:  # a layer registered twice stays one (shared) layer
                done[id(child)] = PerStepBatchNorm.from_batch_norm(child, slots)
            setattr(module, name, done[id(child)])
        else:
            _replace(child, slots, done)


def per_step_norms(model: nn.Module) -> list[PerStepBatchNorm]:
    return [m for m in model.modules() if isinstance(m, PerStepBatchNorm)]


def per_step_norm_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the per-step γ and β."""
    owned = {id(p) for m in per_step_norms(model) for p in m.parameters(recurse=False)}
    return {n for n, p in model.named_parameters() if id(p) in owned}
