"""ANIL, "almost no inner loop" (Raghu et al. 2020): only the head adapts; the body is shared
and meta-learned through the head's adaptation,

    θ'_head = θ_head − α ∇_head L_support(head(features_body(x); θ_head)),

with the meta-objective of MAML (Eq. 3) over (θ_body, θ_head).

The body runs once per set and task: a forward pre-hook on the head captures the features the
head receives, and the inner steps then touch only the head. This works for any model whose
output is the head's output (``model(x) == head(features(x))``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn
from torch.func import functional_call

from metagrad.algorithms.base import Capabilities
from metagrad.algorithms.maml import MAML
from metagrad.core.functional import Params, double_backward_kernels
from metagrad.core.inner_loop import inner_loop
from metagrad.core.taskbatch import Inputs, LossFn
from metagrad.errors import ConfigError


class ANIL(MAML):
    """MAML adapting only ``model.<head>`` (default: the submodule named ``head``); other
    keyword arguments are MAML's, except ``adapt`` (the head is what adapts) and
    ``checkpoint_inner_steps`` (the head's graph is small)."""

    capabilities: ClassVar[Capabilities] = Capabilities(compile=True, precision=False)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 head: str = "head", **kwargs: Any) -> None:
        try:
            self_head = model.get_submodule(head)
        except AttributeError:
            raise ConfigError(f"ANIL needs the model's output layer as submodule {head!r}; the "
                              f"model has: {', '.join(n for n, _ in model.named_children())}"
                              ) from None
        if "adapt" in kwargs:
            raise ConfigError("ANIL adapts the head only; choose it with head=... (or use "
                              "MAML(adapt=...) to adapt another subset); remove adapt=")
        if kwargs.get("checkpoint_inner_steps"):
            raise ConfigError("ANIL's inner steps touch only the head, whose graph is small; "
                              "checkpoint_inner_steps is for MAML, Meta-SGD, MAML++ and CAVIA")
        super().__init__(model, loss_fn, inner_lr, adapt=head, **kwargs)
        self.head_name = head
        self._head = [self_head]  # a list, so that nn.Module does not register it twice

    def features(self, params: Params, x: Inputs, buffers: dict[str, Tensor] | None = None,
                 batch_statistics: bool | None = None) -> Tensor:
        """The input the head receives when the model runs on ``x`` with ``params``."""
        captured: list[Tensor] = []
        hook = self._head[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            self.functional_forward(params, x, buffers, batch_statistics=batch_statistics)
        finally:
            hook.remove()
        return captured[-1]

    def head_forward(self, params: Params, features: Tensor) -> Tensor:
        prefix = self.head_name + "."
        own = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
        return functional_call(self._head[0], own, (features,))

    def adapt(self, support_x: Inputs, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, trajectory: bool = False,
              params: Params | None = None,
              buffers: dict[str, Tensor] | None = None) -> Params | list[Params]:
        steps, first_order, params, buffers = self.adaptation_defaults(
            support_x, support_y, steps, first_order, params, buffers)
        feats = self.features(params, support_x, buffers, batch_statistics=True)
        if first_order:  # the inner gradient is a constant, also with respect to the body
            feats = feats.detach()
        with double_backward_kernels(not first_order):
            return inner_loop(
                lambda p: self.output_loss(self.head_forward(p, feats), support_y),
                params, steps=steps, lr=self.learning_rate(), first_order=first_order,
                adapt=self.adapted_names, trajectory=trajectory,
            )
