"""Learned inner learning rates α, trained in the outer loop.

* Meta-SGD (Li et al. 2017, Eq. 2): θ' = θ − α ⊙ ∇L, α shaped like θ (``per_element=True``),
  stored as is: its rates may change sign, as in its paper.
* MAML++ LSLR (Antoniou et al. 2019, §4): one α per parameter tensor and per inner step
  (``per_step=True``), stored in log space (``log_space=True``): α = exp(ρ), ρ₀ = log(inner_lr),
  so that an outer step changes α by a factor exp(Δρ) and α stays positive (an outer optimizer
  stepping a linear α by a fixed amount, as Adam does, can cross zero and then ascend the support
  loss).

Steps beyond the trained number (e.g. evaluating with more steps than in training) reuse the
last step's rate.

State dict: the linear rates are ``rates.<name>``, the log-space ones ``log_rates.<name>``. A
state dict of the other parameterisation is converted on load (ρ = log α, α = exp ρ); a linear
rate ≤ 0 has no log and is refused with a :class:`~metagrad.errors.CheckpointError`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.core.functional import Params
from metagrad.errors import CheckpointError

LINEAR, LOG = "rates", "log_rates"
"""The state-dict groups of linear and log-space rates."""


def _key(name: str) -> str:
    return name.replace(".", "__")


class InnerLearningRates(nn.Module):
    """One learnable α per adapted parameter (``names``), initialised to ``init`` (> 0 when
    ``log_space``); ``self(step, name)`` is the α the inner loop applies."""

    def __init__(self, params: Params, names: list[str], init: float, *, per_element: bool = True,
                 per_step: bool = False, steps: int = 1, log_space: bool = False) -> None:
        super().__init__()
        self.per_step = per_step
        self.log_space = log_space
        start = math.log(init) if log_space else float(init)
        rates = nn.ParameterDict()
        for name in names:
            shape = tuple(params[name].shape) if per_element else ()
            if per_step:
                shape = (steps, *shape)
            rates[_key(name)] = nn.Parameter(
                torch.full(shape, start, dtype=params[name].dtype, device=params[name].device))
        setattr(self, LOG if log_space else LINEAR, rates)

    @property
    def stored(self) -> nn.ParameterDict:
        """The learned tensors: ρ (``log_space``) or α."""
        return getattr(self, LOG if self.log_space else LINEAR)

    def forward(self, step: int, name: str) -> Tensor:
        rate = self.stored[_key(name)]
        if self.per_step:
            rate = rate[min(step, rate.shape[0] - 1)]
        return rate.exp() if self.log_space else rate

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        mine, other = (LOG, LINEAR) if self.log_space else (LINEAR, LOG)
        for key in self.stored:
            old = f"{prefix}{other}.{key}"
            if old in state_dict and f"{prefix}{mine}.{key}" not in state_dict:
                value = state_dict.pop(old)
                if self.log_space and not bool((value > 0).all()):
                    raise CheckpointError(
                        f"the checkpoint's learned inner rate {prefix}{other}.{key} has values "
                        f"<= 0 (min {value.min().item():.3g}), which the log-space rates "
                        "(α = exp ρ) cannot represent; it was saved by a version whose rates "
                        "could cross zero: retrain, or evaluate it with that version")
                state_dict[f"{prefix}{mine}.{key}"] = value.log() if self.log_space \
                    else value.exp()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
