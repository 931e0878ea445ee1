"""Meta-SGD (Li et al. 2017): θ' = θ − α ⊙ ∇L_support(θ) (Eq. 2) with α a learned tensor of the
same shape as θ, trained with θ in the outer loop (Eq. 3)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from metagrad.algorithms.base import Capabilities
from metagrad.algorithms.maml import MAML
from metagrad.core.taskbatch import LossFn
from metagrad.errors import ConfigError


class MetaSGD(MAML):
    """MAML whose inner learning rates are learned per parameter element, initialised to
    ``inner_lr``; other keyword arguments are MAML's."""

    capabilities: ClassVar[Capabilities] = Capabilities(learn_inner_lr=False, compile=True,
                                                        checkpoint_inner_steps=True)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 **kwargs: Any) -> None:
        if not kwargs.pop("learn_inner_lr", True):
            raise ConfigError("Meta-SGD learns its per-element inner rates by definition; "
                              "remove learn_inner_lr=False (MAML is Meta-SGD with a fixed rate)")
        super().__init__(model, loss_fn, inner_lr, learn_inner_lr=True, **kwargs)
