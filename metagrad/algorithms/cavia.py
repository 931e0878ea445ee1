"""CAVIA, fast context adaptation (Zintgraf et al. 2019; the MAML paper's appendix C "bias
transformation" is the same idea): a context vector φ, reset to 0 for every task, is the only
thing adapted in the inner loop,

    φ' = φ₀ − α ∇_φ L_support(f_θ(x, φ₀)),   φ₀ = 0,

while the network weights θ are learned in the outer loop through that step (Eq. 4). The
context enters the model by concatenation to the input features (``ContextModel``, for fully
connected networks) or, in a convolutional network, through a FiLM layer that scales and shifts
the channels of the third block (:mod:`metagrad.models.film`, §4.2 of the paper; there φ has 100
entries: ``cavia_context_dim``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import (
    Capabilities,
    LearnerSettings,
    require_integer,
    resolve_options,
)
from metagrad.algorithms.maml import MAML
from metagrad.core.taskbatch import LossFn
from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4
from metagrad.models.film import FiLM, with_film_context
from metagrad.models.mlp import MLP


@dataclass
class CAVIAOptions:
    """CAVIA's settings (``--cavia-...`` flags)."""

    cavia_context_dim: int = field(default=5, metadata={
        "help": "size of the context vector adapted in the inner loop"})

    def __post_init__(self) -> None:
        require_integer("cavia_context_dim", self.cavia_context_dim, 1)


class ContextModel(nn.Module):
    """``model(cat([x, φ], dim=1))`` for flat inputs ``[N, features]``; ``φ`` (``context``)
    is a parameter that stays 0 outside adaptation (it is not meta-learned), created with the
    dtype and device of ``model``'s first parameter."""

    vmap_exact_forward = True  # flatten, expand and cat only

    def __init__(self, model: nn.Module, context_dim: int) -> None:
        super().__init__()
        require_integer("context_dim", context_dim, 1)
        self.model = model
        self.context = nn.Parameter(torch.zeros(context_dim, **_factory_kwargs(model)),
                                    requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise ConfigError("CAVIA concatenates its context to one input tensor per example; "
                              f"got {type(x).__name__} inputs")
        x = x.flatten(1)
        return self.model(torch.cat([x, self.context.expand(x.shape[0], -1)], dim=1))


def _factory_kwargs(model: nn.Module) -> dict[str, Any]:
    """The dtype and device of ``model``'s first parameter (the defaults if it has none)."""
    first = next(model.parameters(), None)
    return {} if first is None else dict(dtype=first.dtype, device=first.device)


def with_context_inputs(model: nn.Module, context_dim: int) -> MLP:
    """A freshly initialised :class:`~metagrad.models.mlp.MLP` shaped like ``model`` whose first
    layer reads ``context_dim`` more input features (the task's network, made able to read the
    context: 1-40-40-1 becomes (1 + context_dim)-40-40-1 on sinusoid)."""
    if type(model) is not MLP:
        raise ConfigError(
            f"CAVIA.from_config widens an MLP's first layer for the context, or adds a FiLM "
            f"layer to a Conv4; the task's model is a {type(model).__name__}. Build "
            "CAVIA(model, loss_fn, context_dim=...) with a model that reads input features + "
            "context_dim, or that holds one FiLM layer (metagrad.models.film)")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    sizes = [linears[0].in_features + context_dim, *(m.out_features for m in linears)]
    batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    return MLP(sizes, batch_norm=batch_norm).to(linears[0].weight.dtype)


class CAVIA(MAML):
    """CAVIA around ``model``: a model holding one :class:`~metagrad.models.film.FiLM` layer
    adapts that layer's context (``context_dim`` must then be ``None`` or its size); any other
    model must accept ``input features + context_dim`` inputs (``context_dim`` default 5) and is
    wrapped in a :class:`ContextModel`. Other keyword arguments are MAML's, except ``adapt`` (the
    context is what adapts)."""

    Options: ClassVar[type] = CAVIAOptions
    capabilities: ClassVar[Capabilities] = Capabilities(compile=True, checkpoint_inner_steps=True)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 1.0,
                 context_dim: int | None = None, **kwargs: Any) -> None:
        if "adapt" in kwargs:
            raise ConfigError("CAVIA adapts only its context vector (context_dim); remove "
                              "adapt= (or use MAML(adapt=...) to adapt network parameters)")
        films = [(n, m) for n, m in model.named_modules() if isinstance(m, FiLM)] \
            if isinstance(model, nn.Module) else []
        if len(films) > 1:
            raise ConfigError(f"CAVIA adapts one context vector; the model has {len(films)} FiLM "
                              f"layers ({', '.join(n for n, _ in films)}): keep one")
        if films:
            (name, film), = films
            if context_dim not in (None, film.context.numel()):
                raise ConfigError(f"context_dim={context_dim} differs from the size "
                                  f"{film.context.numel()} of the context of FiLM layer {name!r}")
            super().__init__(model, loss_fn, inner_lr, adapt=f"{name}.context", **kwargs)
        else:
            super().__init__(ContextModel(model, 5 if context_dim is None else context_dim),
                             loss_fn, inner_lr, adapt="context", **kwargs)

    @classmethod
    def from_config(cls, model: nn.Module, loss_fn: LossFn, settings: LearnerSettings,
                    options: Any = None) -> Self:
        """CAVIA on the task's network made able to read the context: a :class:`Conv4` gets a
        FiLM layer after its third block's BatchNorm (:func:`with_film_context`), an MLP is
        widened (:func:`with_context_inputs`)."""
        options = resolve_options(cls.Options, options)
        dim = options.cavia_context_dim
        ready = with_film_context(model, dim) if isinstance(model, Conv4) \
            else with_context_inputs(model, dim)
        return super().from_config(ready, loss_fn, settings, options)

    @classmethod
    def option_arguments(cls, options: CAVIAOptions) -> dict[str, Any]:
        return dict(context_dim=options.cavia_context_dim)
