"""Meta-SGD (Li et al. 2017): θ' = θ − α ⊙ ∇L_support(θ) (Eq. 2) with α a learned tensor of the
same shape as θ, trained with θ in the outer loop (Eq. 3)."""

from __future__ import annotations

from typing import Any

from torch import nn

from metagrad.algorithms.maml import MAML, LossFn


class MetaSGD(MAML):
    """MAML whose inner learning rates are learned per parameter element, initialised to
    ``inner_lr``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 **kwargs: Any) -> None:
        kwargs.pop("learn_inner_lr", None)
        super().__init__(model, loss_fn, inner_lr, learn_inner_lr=True, **kwargs)
