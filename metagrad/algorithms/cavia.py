"""CAVIA, fast context adaptation (Zintgraf et al. 2019; the MAML paper's appendix C "bias
transformation" is the same idea): a context vector φ, reset to 0 for every task, is the only
thing adapted in the inner loop,

    φ' = φ₀ − α ∇_φ L_support(f_θ(x, φ₀)),   φ₀ = 0,

while the network weights θ are learned in the outer loop through that step (Eq. 4). The
context enters the model by concatenation to the input features (``ContextModel``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms.maml import MAML, LossFn
from metagrad.errors import ConfigError


class ContextModel(nn.Module):
    """``model(cat([x, φ], dim=1))`` for flat inputs ``[N, features]``; ``φ`` (``context``)
    is a parameter that stays 0 outside adaptation (it is not meta-learned)."""

    vmap_exact_forward = True  # flatten, expand and cat only

    def __init__(self, model: nn.Module, context_dim: int) -> None:
        super().__init__()
        if context_dim < 1:
            raise ConfigError(f"context_dim must be >= 1, got {context_dim}")
        self.model = model
        self.context = nn.Parameter(torch.zeros(context_dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.model(torch.cat([x, self.context.expand(x.shape[0], -1)], dim=1))


class CAVIA(MAML):
    """``model`` must accept ``input features + context_dim`` inputs."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 1.0,
                 context_dim: int = 5, **kwargs: Any) -> None:
        kwargs.pop("adapt", None)
        super().__init__(ContextModel(model, context_dim), loss_fn, inner_lr, adapt="context",
                         **kwargs)
