"""MAML (Finn, Abbeel & Levine 2017) for any ``nn.Module``, on the functional core.

Meta-objective (Eq. 3, averaged over a batch of tasks T_i):

    min_θ  1/n Σ_i  L_query,i( θ'_i ),   θ'_i = InnerLoop_K(θ; support_i)   (Eq. 1, K steps)

``meta_loss(...).backward()`` fills ``.grad`` of the model's parameters (and of the learned inner
rates) with the exact meta-gradient (second order) or its first-order approximation.

Inputs may be one tensor, a tuple of tensors (``model(*x)``) or a dict of tensors
(``model(**x)``), each with the leading dimensions of :class:`~metagrad.core.taskbatch.TaskBatch`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from metagrad.algorithms.base import (
    Capabilities,
    LearnerSettings,
    MetricFn,
    NoOptions,
    measured_steps,
    resolve_options,
)
from metagrad.core.batching import (
    Batching,
    examples_per_task,
    per_task,
    require_vmap_exact,
    use_vmap,
)
from metagrad.core.functional import (
    FunctionalModel,
    Params,
    ParamSelector,
    batch_norm_uses_batch_statistics,
    double_backward_kernels,
    select_names,
)
from metagrad.core.inner_loop import LearningRate, inner_loop
from metagrad.core.layout import MemoryFormat, layout_policy
from metagrad.core.per_step_norm import per_step_norms
from metagrad.core.precision import Precision, as_float32, check_precision
from metagrad.core.rates import InnerLearningRates
from metagrad.core.taskbatch import (
    Inputs,
    LossFn,
    TaskBatch,
    call_arguments,
    check_loss_fn,
    check_pair,
    check_task_batch,
    describe_typed,
    explained_data_errors,
    scalar_loss,
    task_slices,
    task_tensors,
)
from metagrad.errors import ConfigError


class MAML(nn.Module):
    """Model-agnostic meta-learner around ``model``, whose tensors adaptation never modifies.

    Args:
        model: any ``nn.Module``; parameters shared between layers stay shared; at least one
            parameter must require gradients.
        loss_fn: ``loss_fn(output, target) -> scalar`` (e.g. ``F.cross_entropy``, ``F.mse_loss``);
            a floating-point target must have the output's shape (no silent broadcasting).
        inner_lr: α, a finite number > 0; the initial value when learned.
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
        batching: ``"auto"`` (vmap when verified exact for this model, else a loop), ``"vmap"``
            (refused at construction for a model with a layer not verified exact under vmap for
            the meta-gradient's derivative order), ``"loop"``.
        compile: opt-in: :meth:`meta_gradient` runs ``torch.compile`` of
            ``torch.func.grad_and_value`` of the meta-loss (inner steps and outer backward in one
            graph), after a one-time compilation (see BENCHMARKS.md for when it pays).
        checkpoint_inner_steps: memory-saving mode for second order: each inner step keeps only
            its input θ'ₖ, and the meta-backward recomputes the step's support forward and
            inner gradient, one step at a time (exact: the same meta-gradient). Costs about one
            more support forward and backward per inner step; tasks are looped (not vmapped).
            No effect in first order. The meta-gradient cannot be differentiated again.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): the forward
            passes that run under autocast (:mod:`metagrad.core.precision`): for ``"bf16"`` and
            ``"fp16"`` the query forwards (meta-training loss and evaluation) and so the outer
            backward through them, while the inner loop (support losses, inner gradients and,
            in second order, their derivatives) stays float32. Parameters, learned rates,
            BatchNorm running statistics and every loss stay float32. Not with ``compile``.
        memory_format: ``"auto"`` (default), ``"channels_last"`` or ``"contiguous"``: whether
            image inputs are fed to the model channels-last (NHWC), the layout oneDNN's CPU
            convolutions run fastest on (:mod:`metagrad.core.layout`). The query forwards of
            looped tasks are converted, the inner loop's support forwards are not; the values
            are the same, up to float32 rounding in other kernels. ``"auto"``: on CPU, for
            models that have a 2-d convolution and are built from layers known to be
            layout-agnostic.

    Loss scaling (``"fp16"``): the trainer sets :attr:`loss_scale` to a function applied to each
    loss before :meth:`meta_gradient` back-propagates it, typically ``GradScaler.scale``; then
    ``.grad`` holds the scaled meta-gradient, which ``scaler.step(optimizer)`` unscales (skipping
    the step on inf/NaN) before ``scaler.update()``. The returned loss is unscaled.

    Per-step BatchNorm: layers of ``model`` that are
    :class:`~metagrad.core.per_step_norm.PerStepBatchNorm` (found at construction) are told
    before every forward which parameters they see: slot k for θ'ₖ (the support loss of inner
    step k + 1, the query loss after k steps, evaluation after k steps). MAML++ sets them up
    with ``per_step_bn=True``; any model holding them works with every algorithm built on
    :meth:`functional_forward`.
    """

    Options: ClassVar[type] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities(compile=True,
                                                        checkpoint_inner_steps=True)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01,
                 inner_steps: int = 1, first_order: bool = False, learn_inner_lr: bool = False,
                 adapt: ParamSelector = None, transductive: bool = True,
                 batching: Batching = "auto", inner_rates: nn.Module | None = None,
                 compile: bool = False, checkpoint_inner_steps: bool = False,
                 precision: Precision = "fp32", memory_format: MemoryFormat = "auto") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_loss_fn(loss_fn)
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"inner_steps must be a positive integer, got {inner_steps!r}")
        if not _is_finite_positive(inner_lr):
            raise ConfigError(f"inner_lr must be a finite number > 0, got {inner_lr!r}")
        if next(model.parameters(), None) is not None and not any(
                p.requires_grad for p in model.parameters()):
            raise ConfigError(
                "every parameter of the model has requires_grad=False, so there is nothing to "
                "meta-learn (the meta-gradient would be empty); unfreeze the parameters to learn "
                "(model.requires_grad_(True)), at least those that should be meta-trained")
        if batching not in ("auto", "vmap", "loop"):
            raise ConfigError(f"batching must be 'auto', 'vmap' or 'loop', got {batching!r}")
        if checkpoint_inner_steps and (compile or batching == "vmap"):
            raise ConfigError(
                "checkpoint_inner_steps recomputes each inner step in a custom backward, which "
                "neither torch.compile (compile=True) nor batching='vmap' can trace; use the "
                "default batching (tasks are then looped, one task's graph at a time)")
        self.precision = precision
        self.policy = check_precision(precision)
        """Which forward passes run under autocast (from ``precision``)."""
        if compile and precision != "fp32":
            raise ConfigError(f"compile=True runs in float32 only; remove compile or use "
                              f"precision='fp32' (got precision={precision!r})")
        self.memory_format = memory_format
        self.layout = layout_policy(memory_format, model)
        """Which forward inputs become channels-last (from ``memory_format``)."""
        self.loss_scale: Callable[[Tensor], Tensor] | None = None
        """Applied to each loss before :meth:`meta_gradient` back-propagates it (``None``: none);
        e.g. ``torch.amp.GradScaler.scale`` for ``precision="fp16"``."""
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
        if batching == "vmap":  # never a silently wrong meta-gradient
            require_vmap_exact(model, self.meta_gradient_first_order)

    @property
    def meta_gradient_first_order(self) -> bool:
        """Whether :meth:`meta_gradient` differentiates each task's computation only once (no
        gradient of an inner gradient): the derivative order that ``batching="vmap"`` must be
        exact for."""
        return self.first_order

    @classmethod
    def from_config(cls, model: nn.Module, loss_fn: LossFn, settings: LearnerSettings,
                    options: Any = None) -> Self:
        """The learner for ``model`` (which it owns from then on, and may modify) built from the
        shared ``settings`` and its own ``options`` (an instance of :attr:`Options`; ``None``:
        the defaults), on ``settings.device``. Refuses shared settings that its
        :attr:`capabilities` exclude."""
        options = resolve_options(cls.Options, options)
        cls.capabilities.check(settings, cls.__name__)
        arguments: dict[str, Any] = dict(inner_lr=settings.inner_lr,
                                         inner_steps=settings.inner_steps,
                                         transductive=settings.transductive,
                                         batching=settings.batching)
        for name in ("first_order", "learn_inner_lr", "compile", "checkpoint_inner_steps",
                     "precision", "memory_format"):
            if getattr(cls.capabilities, name):
                arguments[name] = getattr(settings, name)
        return cls(model, loss_fn, **arguments, **cls.option_arguments(options)).to(
            settings.device)

    @classmethod
    def option_arguments(cls, options: Any) -> dict[str, Any]:
        """Constructor keyword arguments from :attr:`Options` (none for MAML)."""
        return {}

    # -- the functional pieces -------------------------------------------------------------
    def params(self) -> Params:
        """θ: the model's parameters by name (the live tensors; gradients flow into them)."""
        return self.functional.params()

    def learning_rate(self) -> LearningRate:
        return self.inner_rates if self.inner_rates is not None else self.inner_lr

    def functional_forward(self, params: Params, x: Inputs,
                           buffers: dict[str, Tensor] | None = None, *,
                           batch_statistics: bool | None = None,
                           step: int | None = None, support: bool = False) -> Tensor:
        """The model's output on ``x`` with parameters ``params`` (e.g. from :meth:`adapt`):
        ``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict.

        ``support``: a support forward of the inner loop (else a query forward), which selects
        its precision (:attr:`policy`) and its inputs' memory layout (:attr:`layout`); a
        low-precision output is returned as float32.

        ``buffers`` default to copies of the model's, so the model's own are never written.
        ``batch_statistics`` forces BatchNorm to use the batch's statistics (default: the
        ``transductive`` setting). ``step``: the number k of inner steps that produced
        ``params`` (θ'ₖ), which selects slot k of per-step BatchNorm layers
        (:class:`~metagrad.core.per_step_norm.PerStepBatchNorm`); ``None``: their last slot.
        No effect on models without such layers."""
        buffers = self.functional.buffers() if buffers is None else buffers
        for norm in self._per_step_norms:
            norm.step = step
        args, kwargs = call_arguments(self.layout.prepare(x, support))
        batch_norm = batch_norm_uses_batch_statistics(self.model) \
            if (self.transductive if batch_statistics is None else batch_statistics) \
            else contextlib.nullcontext()
        reference = next(iter(params.values()))
        with explained_data_errors(
                lambda: f"the model could not process the inputs {describe_typed(x)}",
                reference, "the model's parameters"):
            if self.policy.dtype is None:  # fp32: no autocast, no cast
                with batch_norm:
                    return self.functional(params, buffers, *args, **kwargs)
            with batch_norm, self.policy.autocast(reference.device, support):
                return as_float32(self.functional(params, buffers, *args, **kwargs))

    def output_loss(self, output: Tensor, y: Tensor) -> Tensor:
        """``loss_fn(output, y)``, refusing a floating-point target that would broadcast
        against the output (:func:`~metagrad.core.taskbatch.check_output`)."""
        return scalar_loss(self.loss_fn, output, y)

    def loss(self, params: Params, x: Inputs, y: Tensor,
             buffers: dict[str, Tensor] | None = None, *,
             batch_statistics: bool | None = None, step: int | None = None,
             support: bool = False) -> Tensor:
        """``loss_fn(model(x; params), y)`` (``support``: as in :meth:`functional_forward`)."""
        out = self.functional_forward(params, x, buffers, batch_statistics=batch_statistics,
                                      step=step, support=support)
        return self.output_loss(out, y)

    def adaptation_defaults(self, support_x: Inputs, support_y: Tensor, steps: int | None,
                            first_order: bool | None, params: Params | None,
                            buffers: dict[str, Tensor] | None
                            ) -> tuple[int, bool, Params, dict[str, Tensor]]:
        """The prologue every :meth:`adapt` shares: checks one task's support set and ``steps``,
        and fills in the defaults: (K, the learner's ``first_order``, θ, copies of the model's
        buffers)."""
        steps = self.inner_steps if steps is None else steps
        _check_steps(steps)
        check_pair(support_x, support_y, "support")
        return (steps, self.first_order if first_order is None else first_order,
                self.params() if params is None else params,
                self.functional.buffers() if buffers is None else buffers)

    def adapt(self, support_x: Inputs, support_y: Tensor, steps: int | None = None, *,
              first_order: bool | None = None, trajectory: bool = False,
              params: Params | None = None,
              buffers: dict[str, Tensor] | None = None) -> Params | list[Params]:
        """θ' after ``steps`` (default K) inner steps on one task's support set (no task dim),
        Eq. 1: θ'ₖ₊₁ = θ'ₖ − α ∇L_support(θ'ₖ).

        ``steps=0`` returns θ. With ``trajectory=True``: the list [θ'₀, …, θ'_steps].
        """
        steps, first_order, params, buffers = self.adaptation_defaults(
            support_x, support_y, steps, first_order, params, buffers)
        with double_backward_kernels(not first_order):
            return inner_loop(
                lambda p, step: self.loss(p, support_x, support_y, buffers,
                                          batch_statistics=True, step=step, support=True),
                params, steps=steps, lr=self.learning_rate(), first_order=first_order,
                adapt=self.adapted_names, trajectory=trajectory,
                checkpoint=self.checkpoint_inner_steps, step_aware=True,
            )

    def task_query_loss(self, support_x: Inputs, support_y: Tensor, query_x: Inputs,
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

    def _writes_running_statistics(self) -> bool:
        """Non-transductive meta-training of a model with BatchNorm running statistics: each
        task's query forward updates them."""
        return not self.transductive and self.model.training and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for m in self.model.modules())

    def _tracks_per_step_statistics(self) -> bool:
        """Non-transductive meta-training of a model with per-step BatchNorm (BNRS)."""
        return bool(self._per_step_norms) and not self.transductive and self.model.training

    def step_weights(self, steps: int) -> list[float] | None:
        """Weights of the query loss after each inner step (MAML++'s multi-step loss);
        ``None``: the loss after the last step only (MAML)."""
        return None

    def meta_loss(self, support_x: Inputs, support_y: Tensor, query_x: Inputs, query_y: Tensor,
                  steps: int | None = None) -> Tensor:
        """Mean over tasks (leading dimension) of the query loss after adaptation (Eq. 3)."""
        return self._meta_loss((support_x, support_y, query_x, query_y), steps, backward=False)

    def forward(self, support_x: Inputs, support_y: Tensor, query_x: Inputs,
                query_y: Tensor) -> Tensor:
        """The meta-loss, so that the learner itself is a function of its parameters."""
        return self.meta_loss(support_x, support_y, query_x, query_y)

    def _compiled_meta_gradient(self, batch: TaskBatch) -> Tensor:
        if self._compiled_gradient is None:
            self._compiled_gradient = torch.compile(grad_and_value(
                lambda p, *data: functional_call(self, p, data)), dynamic=False)
        live = dict(self.named_parameters())
        grads, loss = self._compiled_gradient({n: p.detach() for n, p in live.items()},
                                              *task_tensors(batch))
        for name, p in live.items():
            if p.requires_grad:
                p.grad = grads[name] if p.grad is None else p.grad + grads[name]
        return loss.detach()

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        """Accumulates the meta-gradient of one task batch into ``.grad``; returns the loss.

        The one method a trainer calls; algorithms whose outer gradient is not the derivative of
        a loss (Reptile, iMAML) override it. When tasks are looped, each task's graph is
        back-propagated and freed before the next is built (peak memory of one task, not all)."""
        if self.compile:
            return self._compiled_meta_gradient(batch)
        return self._meta_loss(task_tensors(batch), None, backward=True)

    def evaluation_curve(self, batch: TaskBatch, max_steps: int, metric: MetricFn,
                         at: Sequence[int] | None = None) -> Tensor:
        """``[tasks, len(at)]``: ``metric(output, query_y)`` of each task of ``batch`` at θ'ₖ
        for k in ``at`` (default 0..``max_steps``; Eq. 1 from θ), evaluated with slot k of
        per-step BatchNorm. Only the measured θ'ₖ meet the query set.

        Adaptation starts from a detached θ and takes first-order steps (the same values, no
        graph); queries are evaluated without a graph; the learner's parameters and buffers are
        not modified. Tasks are batched like the meta-gradient (``batching``)."""
        check_task_batch(*task_tensors(batch))
        _check_steps(max_steps)
        steps = measured_steps(at, max_steps)
        theta = {n: p.detach() for n, p in self.params().items()}

        def task_curve(sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor) -> Tensor:
            path = self.adapt(sx, sy, steps[-1], first_order=True, trajectory=True,
                              params=theta)
            with torch.no_grad():
                return torch.stack([metric(self.functional_forward(path[k], qx, step=k), qy)
                                    for k in steps])

        return per_task(task_curve, task_tensors(batch), self.batching, self.model,
                        first_order=True).detach()

    def _meta_loss(self, tasks: tuple[Inputs, Tensor, Inputs, Tensor], steps: int | None,
                   backward: bool) -> Tensor:
        check_task_batch(*tasks)
        if steps is not None:
            _check_steps(steps)
        buffers = self.functional.buffers()

        def task_loss(sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor) -> Tensor:
            return self.task_query_loss(sx, sy, qx, qy, steps, buffers)

        # checkpointed inner steps are a custom autograd.Function, and running statistics are
        # updated in place task after task: vmap can batch neither
        batching: Batching = "loop" if self.checkpoint_inner_steps \
            or self._writes_running_statistics() else self.batching
        with double_backward_kernels(not self.first_order):
            if backward and not use_vmap(batching, self.model, self.first_order,
                                         examples_per_task(tasks)):
                n = tasks[1].shape[0]
                losses = []
                for task in task_slices(tasks):
                    loss = task_loss(*task)
                    self.scaled_loss(loss / n).backward()
                    losses.append(loss.detach())
                loss = torch.stack(losses).mean()
            else:
                loss = per_task(task_loss, tasks, batching, self.model,
                                self.first_order).mean()
                if backward:
                    self.scaled_loss(loss).backward()
                    loss = loss.detach()
        if not self.transductive and self.model.training:
            self._store_running_statistics(buffers)
        return loss

    def scaled_loss(self, loss: Tensor) -> Tensor:
        """``loss`` through :attr:`loss_scale`: what a ``meta_gradient`` back-propagates (an
        override that calls ``.backward()`` itself must use it too)."""
        return loss if self.loss_scale is None else self.loss_scale(loss)

    @torch.no_grad()
    def _store_running_statistics(self, buffers: dict[str, Tensor]) -> None:
        for name, buffer in self.model.named_buffers():
            buffer.copy_(buffers[name])


def _check_steps(steps: object) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")


def _is_finite_positive(value: object) -> bool:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
