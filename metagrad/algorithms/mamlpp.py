"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML"), each part switchable:

* multi-step loss (MSL, §4): the meta-loss is Σₖ wₖ L_query(θ'ₖ) over all K inner steps; the
  weights start uniform and are annealed toward the last step over ``msl_epochs`` epochs
  (non-final weights decay linearly to 0.03/K), after which only the last step counts;
* derivative-order annealing (DA): first order for the first ``first_order_epochs`` epochs,
  second order afterwards;
* learned per-layer per-step inner rates (LSLR): one α per parameter tensor and inner step,
  learned in log space, α = exp(ρ) with ρ₀ = log(inner_lr), so that they stay positive
  (:class:`~metagrad.core.rates.InnerLearningRates`; checkpoints of linear rates load);
* cosine annealing of the meta learning rate: a trainer setting (``meta_lr_schedule``);
* per-step BatchNorm (``per_step_bn=True``, off by default): every ``nn.BatchNorm1d/2d`` of the
  model becomes a :class:`~metagrad.core.per_step_norm.PerStepBatchNorm` with K + 1 slots, the
  parameters θ'ₖ after k inner steps being evaluated with slot k (support forward of step k + 1,
  query loss after k steps, evaluation after k steps). BNWB: a γ, β per slot, learned in the
  outer loop and, as in the paper's code, not adapted in the inner loop (pass ``adapt=`` to
  choose otherwise). BNRS: with ``transductive=False``, running statistics per slot, updated
  during meta-training from the queries at θ'ₖ and read by evaluation in eval mode.

An epoch is ``iterations_per_epoch`` meta-iterations (500 in the paper). The iteration count is a
buffer, so a resumed run continues the schedules where it stopped. With every switch off this is
MAML exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metagrad.algorithms.base import Capabilities, require_integer
from metagrad.algorithms.maml import MAML
from metagrad.core.per_step_norm import per_step_batch_norm, per_step_norm_parameter_names
from metagrad.core.rates import InnerLearningRates
from metagrad.core.taskbatch import LossFn, TaskBatch
from metagrad.errors import ConfigError


def multi_step_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Importance of the query loss after each of ``steps`` inner steps at ``epoch``."""
    if steps == 1:
        return [1.0]
    floor = 0.03 / steps
    decay = epoch / (steps * msl_epochs)
    early = [max(1.0 / steps - decay, floor)] * (steps - 1)
    last = min(1.0 / steps + decay * (steps - 1), 1.0 - floor * (steps - 1))
    return [*early, last]


@dataclass
class MAMLppOptions:
    """MAML++'s settings (``--mamlpp-...`` flags)."""

    mamlpp_multi_step_loss: bool = field(default=True, metadata={
        "help": "multi-step loss: weighted query losses after every inner step (MSL)"})
    mamlpp_msl_epochs: int = field(default=10, metadata={
        "help": "epochs over which the multi-step weights anneal toward the last step"})
    mamlpp_first_order_epochs: int = field(default=0, metadata={
        "help": "epochs of first-order meta-gradients before second order (DA)"})
    mamlpp_step_lrs: bool = field(default=True, metadata={
        "help": "learn one inner rate per layer and inner step (LSLR)"})
    mamlpp_per_step_bn: bool = field(default=False, metadata={
        "help": "per-step BatchNorm weights and running statistics (BNWB, BNRS)"})
    iterations_per_epoch: int = field(default=500, metadata={
        "help": "meta-iterations per epoch of the MSL and DA schedules"})

    def __post_init__(self) -> None:
        require_integer("mamlpp_msl_epochs", self.mamlpp_msl_epochs, 1)
        require_integer("mamlpp_first_order_epochs", self.mamlpp_first_order_epochs, 0)
        require_integer("iterations_per_epoch", self.iterations_per_epoch, 1)


class MAMLpp(MAML):
    """MAML with MAML++'s switches (see the module doc); other keyword arguments are MAML's,
    except ``learn_inner_lr`` (the rates are ``learn_step_lrs``'s)."""

    Options: ClassVar[type] = MAMLppOptions
    capabilities: ClassVar[Capabilities] = Capabilities(learn_inner_lr=False,
                                                        checkpoint_inner_steps=True)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.1,
                 inner_steps: int = 5, *, multi_step_loss: bool = True, msl_epochs: int = 10,
                 first_order_epochs: int = 0, learn_step_lrs: bool = True,
                 iterations_per_epoch: int = 500, per_step_bn: bool = False,
                 **kwargs: Any) -> None:
        if kwargs.get("learn_inner_lr"):
            raise ConfigError("MAML++ learns one inner rate per layer and step (learn_step_lrs); "
                              "learn_inner_lr (Meta-SGD's per-element rates) does not combine "
                              "with it: remove learn_inner_lr")
        require_integer("msl_epochs", msl_epochs, 1)
        require_integer("first_order_epochs", first_order_epochs, 0)
        require_integer("iterations_per_epoch", iterations_per_epoch, 1)
        if per_step_bn and isinstance(model, nn.Module) and isinstance(inner_steps, int) \
                and inner_steps >= 1:
            # BNWB + BNRS: slot k for θ'ₖ, k = 0..K (``model`` is changed in place)
            per_step_batch_norm(model, inner_steps + 1)
            if kwargs.get("adapt") is None:  # the per-step γ, β are learned in the outer loop
                bn_names = per_step_norm_parameter_names(model)
                kwargs["adapt"] = [n for n, _ in model.named_parameters() if n not in bn_names]
        super().__init__(model, loss_fn, inner_lr, inner_steps, **kwargs)
        self.per_step_bn = per_step_bn
        if learn_step_lrs:
            self.inner_rates = InnerLearningRates(self.params(), self.adapted_names, inner_lr,
                                                  per_element=False, per_step=True,
                                                  steps=inner_steps, log_space=True)
        self.multi_step_loss = multi_step_loss
        self.msl_epochs = msl_epochs
        self.first_order_epochs = first_order_epochs
        self.iterations_per_epoch = iterations_per_epoch
        self.second_order_after_annealing = not self.first_order
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @classmethod
    def option_arguments(cls, options: MAMLppOptions) -> dict[str, Any]:
        return dict(multi_step_loss=options.mamlpp_multi_step_loss,
                    msl_epochs=options.mamlpp_msl_epochs,
                    first_order_epochs=options.mamlpp_first_order_epochs,
                    learn_step_lrs=options.mamlpp_step_lrs,
                    per_step_bn=options.mamlpp_per_step_bn,
                    iterations_per_epoch=options.iterations_per_epoch)

    @property
    def epoch(self) -> int:
        return int(self.iteration) // self.iterations_per_epoch

    def step_weights(self, steps: int) -> list[float] | None:
        if not (self.multi_step_loss and self.training and self.epoch < self.msl_epochs):
            return None
        return multi_step_weights(steps, self.epoch, self.msl_epochs)

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        self.first_order = (not self.second_order_after_annealing
                            or self.epoch < self.first_order_epochs)
        loss = super().meta_gradient(batch)
        self.iteration += 1
        return loss
