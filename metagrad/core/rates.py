"""Learned inner learning rates α, trained in the outer loop.

* Meta-SGD (Li et al. 2017, Eq. 2): θ' = θ − α ⊙ ∇L, α shaped like θ (``per_element=True``).
* MAML++ LSLR (Antoniou et al. 2019, §4): one α per parameter tensor and per inner step
  (``per_step=True``).

Steps beyond the trained number (e.g. evaluating with more steps than in training) reuse the
last step's rate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagrad.core.functional import Params


def _key(name: str) -> str:
    return name.replace(".", "__")


class InnerLearningRates(nn.Module):
    """One learnable α per adapted parameter (``names``), initialised to ``init``."""

    def __init__(self, params: Params, names: list[str], init: float, *, per_element: bool = True,
                 per_step: bool = False, steps: int = 1) -> None:
        super().__init__()
        self.per_step = per_step
        self.rates = nn.ParameterDict()
        for name in names:
            shape = tuple(params[name].shape) if per_element else ()
            if per_step:
                shape = (steps, *shape)
            self.rates[_key(name)] = nn.Parameter(
                torch.full(shape, float(init), dtype=params[name].dtype, device=params[name].device)
            )

    def forward(self, step: int, name: str) -> Tensor:
        rate = self.rates[_key(name)]
        if self.per_step:
            rate = rate[min(step, rate.shape[0] - 1)]
        return rate
