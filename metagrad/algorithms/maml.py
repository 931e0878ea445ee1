"""MAML (Finn, Abbeel & Levine 2017) for any ``nn.Module``, on the functional core.

Meta-objective (Eq. 3, averaged over a batch of tasks T_i):

    min_θ  1/n Σ_i  L_query,i( θ'_i ),   θ'_i = InnerLoop_K(θ; support_i)   (Eq. 1, K steps)

``meta_loss(...).backward()`` fills ``.grad`` of the model's parameters (and of the learned inner
rates) with the exact meta-gradient (second order) or its first-order approximation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from metagrad.core.batching import Batching, per_task, use_vmap
from metagrad.core.functional import (
    FunctionalModel,
    Params,
    ParamSelector,
    batch_norm_uses_batch_statistics,
    double_backward_kernels,
    select_names,
)
from metagrad.core.inner_loop import LearningRate, inner_loop
from metagrad.core.per_step_norm import per_step_norms
from metagrad.core.rates import InnerLearningRates
from metagrad.core.taskbatch import LossFn, TaskBatch, check_pair, check_task_batch
from metagrad.errors import ConfigError


class MAML(nn.Module):
    """Model-agnostic meta-learner around ``model``, whose tensors adaptation never modifies.

    Args:
        model: any ``nn.Module``; parameters shared between layers stay shared.
        loss_fn: ``loss_fn(output, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``).
        inner_lr: α; the initial value when learned.
        inner_steps: K, the default number of inner steps (``adapt(..., steps=)`` overrides).
        first_order: FOMAML: inner gradients treated as constants.
        learn_inner_lr: learn α per parameter element (Meta-SGD).
        adapt: which parameters adapt (None = all; a prefix such as ``"head"``, names, or a
            predicate ``(name, tensor) -> bool``); the rest are shared (ANIL).
        transductive: BatchNorm policy. The support set, being given data, is always normalised
            with its own batch statistics during adaptation, and running statistics are never
            written by :meth:`adapt`. ``True`` (the paper's code): queries too are normalised
            with their own batch statistics. ``False``: queries follow the model's mode; in
            train mode :meth:`meta_loss` normalises them with batch statistics and updates the
            model's running statistics from them (once per call), in eval mode they are
            normalised with the running statistics, so each prediction is independent of the
            other queries.
        batching: ``"auto"`` (vmap when verified exact for this model, else a loop), ``"vmap"``,
            ``"loop"``.
        compile: opt-in: :meth:`meta_gradient` runs ``torch.compile`` of
            ``torch.func.grad_and_value`` of the meta-loss (inner steps and outer backward in one
            graph). 27-35× faster than the fastest peer on the sinusoid MLP after a one-time
            compile of 15-40 s; not recommended for conv nets (see BENCHMARKS.md).
        checkpoint_inner_steps: memory-saving mode for second order: each inner step keeps only
            its input θ'ₖ, and the meta-backward recomputes the step's support forward and
            inner gradient, one step at a time (exact: the same meta-gradient). Costs about one
            more support forward and backward per inner step; tasks are looped (not vmapped).
            No effect in first order. The meta-gradient cannot be differentiated again.

    Per-step BatchNorm: layers of ``model`` that are
    :class:`~metagrad.core.per_step_norm.PerStepBatchNorm` (found at construction) are told
    before every forward which parameters they see: slot k for θ'ₖ (the support loss of inner
    step k + 1, the query loss after k steps, evaluation after k steps). MAML++ sets them up
    with ``per_step_bn=True``; any model holding them works with every algorithm built on
    :meth:`functional_forward`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 inner_steps: int = 1, first_order: bool = False, learn_inner_lr: bool = False,
                 adapt: ParamSelector = None, transductive: bool = True,
                 batching: Batching = "auto", inner_rates: nn.Module | None = None,
                 compile: bool = False, checkpoint_inner_steps: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        if not inner_lr > 0:
            raise ConfigError(f"inner_lr must be > 0, got {inner_lr!r}")
        if batching not in ("auto", "vmap", "loop"):
            raise ConfigError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}")
        if checkpoint_inner_steps and (compile or batching == "vmap"):
            raise ConfigError(
                "checkpoint_inner_steps recomputes each inner step in a custom backward, which "
                "neither torch.compile (compile=True) nor batching='vmap' can trace; use the "
                "default batching (tasks are then looped, one task's graph at a time)")
        self.model = model
        self.functional = FunctionalModel(model)
        self.loss_fn = loss_fn
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.transductive = transductive
        self.batching: Batching = batching
        params = self.functional.params()
        self.adapted_names = select_names(params, adapt)
        if not self.adapted_names:
            raise ConfigError(
                f"no parameters selected for adaptation by adapt={adapt!r}; the model's "
                f"parameters are: {', '.join(list(params)[:12]) or '(none)'}"
            )
        if inner_rates is None and learn_inner_lr:
            inner_rates = InnerLearningRates(params, self.adapted_names, inner_lr, per_element=True)
        self.inner_rates = inner_rates
        self.inner_lr = float(inner_lr)
        self.compile = compile
        self.checkpoint_inner_steps = bool(checkpoint_inner_steps)
        self._compiled_gradient: Callable[..., tuple[Params, Tensor]] | None = None
        # per-step BatchNorm layers (MAML++ BNWB/BNRS), told the step before each forward;
        # a plain list (not registered again); empty for ordinary models
        self._per_step_norms = per_step_norms(model)

    # -- the functional pieces -------------------------------------------------------------
    def params(self) -> Params:
        """θ: the model's parameters by name (the live tensors; gradients flow into them)."""
        return self.functional.params()

    def learning_rate(self) -> LearningRate:
        return self.inner_rates if self.inner_rates is not None else self.inner_lr

    def functional_forward(self, params: Params, x: Tensor,
                           buffers: dict[str, Tensor] | None = None, *,
                           batch_statistics: bool | None = None,
                           step: int | None = None) -> Tensor:
        """The model's output on ``x`` with parameters ``params`` (e.g. from :meth:`adapt`).

        ``buffers`` default to copies of the model's, so the model's own are never written.
        ``batch_statistics`` forces BatchNorm to use the batch's statistics (default: the
        ``transductive`` setting). ``step``: the number k of inner steps that produced
        ``params`` (θ'ₖ), which selects slot k of per-step BatchNorm layers
        (:class:`~metagrad.core.per_step_norm.PerStepBatchNorm`); ``None``: their last slot.
        No effect on models without such layers."""
        buffers = self.functional.buffers() if buffers is None else buffers
        for norm in self._per_step_norms:
            norm.step = step
        if self.transductive if batch_statistics is None else batch_statistics:
            with batch_norm_uses_batch_statistics(self.model):
                return self.functional(params, buffers, x)
        return self.functional(params, buffers, x)

    def loss(self, params: Params, x: Tensor, y: Tensor,
             buffers: dict[str, Tensor] | None = None, *,
             batch_statistics: bool | None = None, step: int | None = None) -> Tensor:
        """``loss_fn(model(x; params), y)``."""
        out = self.functional_forward(params, x, buffers, batch_statistics=batch_statistics,
                                      step=step)
        return self.loss_fn(out, y)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, trajectory: bool = False,
              params: Params | None = None,
              buffers: dict[str, Tensor] | None = None) -> Params | list[Params]:
        """θ' after ``steps`` (default K) inner steps on one task's support set (no task dim).

        ``steps=0`` returns θ. With ``trajectory=True``: the list [θ'₀, …, θ'_steps].
        """
        steps = self.inner_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        check_pair(support_x, support_y, "support")
        first_order = self.first_order if first_order is None else first_order
        buffers = self.functional.buffers() if buffers is None else buffers
        with double_backward_kernels(not first_order):
            return inner_loop(
                lambda p, step: self.loss(p, support_x, support_y, buffers,
                                          batch_statistics=True, step=step),
                self.params() if params is None else params,
                steps=steps, lr=self.learning_rate(), first_order=first_order,
                adapt=self.adapted_names, trajectory=trajectory,
                checkpoint=self.checkpoint_inner_steps, step_aware=True,
            )

    def task_query_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                        query_y: Tensor, steps: int | None = None,
                        buffers: dict[str, Tensor] | None = None) -> Tensor:
        """L_query(θ'_K) for one task; with :meth:`step_weights`, Σₖ wₖ L_query(θ'ₖ), k = 1..K.

        θ'ₖ is evaluated with slot k of per-step BatchNorm layers."""
        buffers = self.functional.buffers() if buffers is None else buffers
        steps = self.inner_steps if steps is None else steps
        weights = self.step_weights(steps)
        if weights is None and not self._tracks_per_step_statistics():
            adapted = self.adapt(support_x, support_y, steps, buffers=buffers)
            return self.loss(adapted, query_x, query_y, buffers, step=steps)
        path = self.adapt(support_x, support_y, steps, buffers=buffers, trajectory=True)
        terms = [(1.0, steps)] if weights is None else list(zip(weights, range(1, steps + 1),
                                                                strict=True))
        if self._tracks_per_step_statistics():
            # BNRS: the running statistics of every slot that evaluation reads (θ'ₖ with slot k,
            # k = 0..K) follow the queries' statistics at θ'ₖ, also at steps the loss leaves out
            used = {k for _, k in terms}
            with torch.no_grad():
                for k, p in enumerate(path):
                    if k not in used:
                        self.functional_forward({n: t.detach() for n, t in p.items()},
                                                query_x, buffers, step=k)
        return sum(w * self.loss(path[k], query_x, query_y, buffers, step=k) for w, k in terms)

    def _tracks_per_step_statistics(self) -> bool:
        """Non-transductive meta-training of a model with per-step BatchNorm (BNRS)."""
        return bool(self._per_step_norms) and not self.transductive and self.model.training

    def step_weights(self, steps: int) -> list[float] | None:
        """Weights of the query loss after each inner step (MAML++'s multi-step loss);
        ``None``: the loss after the last step only (MAML)."""
        return None

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int | None = None) -> Tensor:
        """Mean over tasks (leading dimension) of the query loss after adaptation (Eq. 3)."""
        return self._meta_loss((support_x, support_y, query_x, query_y), steps, backward=False)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                query_y: Tensor) -> Tensor:
        """The meta-loss, so that the learner itself is a function of its parameters."""
        return self.meta_loss(support_x, support_y, query_x, query_y)

    def _compiled_meta_gradient(self, batch: TaskBatch) -> Tensor:
        if self._compiled_gradient is None:
            self._compiled_gradient = torch.compile(grad_and_value(
                lambda p, *data: functional_call(self, p, data)), dynamic=False)
        live = dict(self.named_parameters())
        grads, loss = self._compiled_gradient({n: p.detach() for n, p in live.items()},
                                              *batch.tensors())
        for name, p in live.items():
            if p.requires_grad:
                p.grad = grads[name] if p.grad is None else p.grad + grads[name]
        return loss.detach()

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        """Accumulates the meta-gradient of one task batch into ``.grad``; returns the loss.

        The one method a trainer calls; algorithms whose outer gradient is not the derivative of
        a loss (Reptile, iMAML) override it. When tasks are looped, each task's graph is
        back-propagated and freed before the next is built (peak memory of one task, not all:
        5× less on Omniglot 20-way, at the same speed)."""
        if self.compile:
            return self._compiled_meta_gradient(batch)
        return self._meta_loss(batch.tensors(), None, backward=True)

    def _meta_loss(self, tasks: tuple[Tensor, Tensor, Tensor, Tensor], steps: int | None,
                   backward: bool) -> Tensor:
        check_task_batch(*tasks)
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        buffers = self.functional.buffers()

        def task_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            return self.task_query_loss(sx, sy, qx, qy, steps, buffers)

        # checkpointed inner steps are a custom autograd.Function, which vmap cannot batch
        batching: Batching = "loop" if self.checkpoint_inner_steps else self.batching
        with double_backward_kernels(not self.first_order), _explain_model_errors(tasks[0]):
            if backward and not use_vmap(batching, self.model, self.first_order):
                n = tasks[0].shape[0]
                losses = []
                for task in zip(*tasks, strict=True):
                    loss = task_loss(*task)
                    (loss / n).backward()
                    losses.append(loss.detach())
                loss = torch.stack(losses).mean()
            else:
                loss = per_task(task_loss, tasks, batching, self.model,
                                self.first_order).mean()
                if backward:
                    loss.backward()
                    loss = loss.detach()
        if not self.transductive and self.model.training:
            self._store_running_statistics(buffers)
        return loss

    @torch.no_grad()
    def _store_running_statistics(self, buffers: dict[str, Tensor]) -> None:
        for name, buffer in self.model.named_buffers():
            buffer.copy_(buffers[name])


@contextlib.contextmanager
def _explain_model_errors(support_x: Tensor) -> Iterator[None]:
    """A shape mismatch between the data and the model is a user error: say so."""
    try:
        yield
    except RuntimeError as exc:
        if "shape" not in str(exc) and "size" not in str(exc):
            raise
        raise ConfigError(
            f"the model or loss could not process this task batch (support_x "
            f"{tuple(support_x.shape)} = [tasks, examples, *input]): {str(exc).splitlines()[0]}"
        ) from exc
