"""Reptile (Nichol, Achiam & Schulman 2018, Alg. 2): k plain SGD steps on each task's data give
φᵢ; the outer update is θ ← θ + ε · meanᵢ(φᵢ − θ). No second derivatives.

As in the paper and its code (``supervised-reptile``), the inner loop trains on all of a task's
training data, here its support and query sets together (``inner_data="task"``);
``inner_data="support"`` trains on the support set only, as the other algorithms adapt.
``inner_batch`` = b makes each step a minibatch, as the paper's code does: the k-th step takes the
k-th block of b examples of the task's data in a random order, drawn afresh (without
replacement) each time the data is used up. With disjoint minibatches the expected update
contains the term that raises the inner product of gradients of different batches
(the paper's §5, AvgGradInner); full-batch steps reduce it to joint training plus a
gradient-norm penalty. The paper's 1-shot Omniglot recipe trains on 10 images per class (here
1 shot + 9 queries), minibatches of 10, 5 steps. Evaluation adapts on the support set (full
batch), as every learner does.

:meth:`Reptile.meta_gradient` writes g = θ − meanᵢ φᵢ into ``.grad``, so ``SGD(lr=ε)`` performs
exactly that update (and any other optimizer a variant of it, e.g. Adam as in the paper's
follow-up experiments).

``inner_optimizer="adam"`` takes the inner steps as the paper's code does: Adam with β₁ = 0
(:class:`InnerAdam`), whose second-moment estimate and step count carry over from task to task
for the whole of meta-training (the code restores only the model's weights between tasks), so
tasks are adapted one after another; evaluation adapts each task from a copy of that state and
leaves it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metagrad.algorithms.base import Capabilities, MetricFn, measured_steps
from metagrad.algorithms.maml import MAML
from metagrad.core.batching import per_task
from metagrad.core.functional import Params
from metagrad.core.inner_loop import inner_gradient
from metagrad.core.taskbatch import (
    Inputs,
    LossFn,
    TaskBatch,
    check_task_batch,
    map_inputs,
    task_slices,
    task_tensors,
)
from metagrad.errors import ConfigError

InnerData = Literal["support", "task"]
INNER_DATA = ("support", "task")
InnerOptimizer = Literal["sgd", "adam"]
INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass
class ReptileOptions:
    """Reptile's settings (``--reptile-...`` flags)."""

    reptile_inner_data: InnerData = field(default="task", metadata={
        "help": "data of the inner SGD steps: the task's support and query sets (task, as the "
                "paper) or the support set only"})

    reptile_inner_batch: int | None = field(default=None, metadata={
        "help": "examples per inner step (minibatches drawn without replacement from the inner "
                "data, as the paper's code; none: all of it every step)"})

    reptile_inner_optimizer: InnerOptimizer = field(default="sgd", metadata={
        "help": "optimizer of the inner steps: sgd (steps of inner_lr), or adam (the paper's "
                "code: Adam with beta1 = 0 and learning rate inner_lr, its state carried over "
                "from task to task; one process only)"})

    def __post_init__(self) -> None:
        _check_options(self.reptile_inner_data, self.reptile_inner_batch,
                       self.reptile_inner_optimizer)


def _check_options(inner_data: object, inner_batch: object, inner_optimizer: object) -> None:
    if inner_data not in INNER_DATA:
        raise ConfigError(f"reptile_inner_data must be one of {INNER_DATA}, got {inner_data!r}")
    if inner_optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"reptile_inner_optimizer must be one of {INNER_OPTIMIZERS}, got "
                          f"{inner_optimizer!r}")
    if inner_batch is not None and (not isinstance(inner_batch, int)
                                    or isinstance(inner_batch, bool) or inner_batch < 1):
        raise ConfigError(f"reptile_inner_batch must be a positive integer or none, got "
                          f"{inner_batch!r}")


class InnerAdam(nn.Module):
    """The state of Adam with β₁ = 0 over the adapted parameters: the second moments v (one
    buffer per parameter) and the step count t, saved in checkpoints with the learner.

    One step on gradient g, as ``torch.optim.Adam(betas=(0, β₂), eps=ε)`` computes it (the
    paper's TensorFlow code differs only in adding ε before the bias correction):
    t ← t + 1, v ← β₂ v + (1 − β₂) g², θ ← θ − α g / (√v / √(1 − β₂ᵗ) + ε)."""

    def __init__(self, params: Params, names: list[str], beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.names = list(names)
        self.beta2, self.eps = beta2, eps
        self.register_buffer("t", torch.zeros((), dtype=torch.long))
        for name in self.names:
            self.register_buffer(self._buffer(name), torch.zeros_like(params[name].detach()))

    @staticmethod
    def _buffer(name: str) -> str:
        return "v_" + name.replace(".", "__")

    def state(self) -> tuple[int, Params]:
        """(t, v): a copy of the stored state."""
        return int(self.t), {n: getattr(self, self._buffer(n)).clone() for n in self.names}

    def store(self, t: int, v: Params) -> None:
        self.t.fill_(t)
        for name in self.names:
            getattr(self, self._buffer(name)).copy_(v[name])

    def step(self, params: Params, grads: Params, lr: float, t: int, v: Params
             ) -> tuple[Params, int, Params]:
        """(θ', t + 1, v') after one step on ``grads`` from state (``t``, ``v``)."""
        t += 1
        v = {n: self.beta2 * v[n] + (1 - self.beta2) * grads[n] ** 2 for n in self.names}
        correction = math.sqrt(1 - self.beta2 ** t)
        new = {n: params[n] - lr * grads[n] / (v[n].sqrt() / correction + self.eps)
               for n in self.names}
        return {**params, **new}, t, v


class Reptile(MAML):
    """Reptile on MAML's inner loop (``first_order`` and learned rates do not apply: the update
    uses no derivative of the inner steps); ``inner_data`` chooses the inner steps' data (see
    the module doc) and ``inner_batch`` its minibatch size (None: full batch); other keyword
    arguments are MAML's. :meth:`meta_gradient` returns the
    query loss at φᵢ (with ``inner_data="task"``, a loss on data the inner steps trained on)."""

    Options: ClassVar[type] = ReptileOptions
    capabilities: ClassVar[Capabilities] = Capabilities(first_order=False, learn_inner_lr=False,
                                                        precision=False)

    def __init__(self, model: nn.Module, loss_fn: LossFn, inner_lr: float = 0.01, *,
                 inner_data: InnerData = "task", inner_batch: int | None = None,
                 inner_optimizer: InnerOptimizer = "sgd", **kwargs: Any) -> None:
        _check_options(inner_data, inner_batch, inner_optimizer)
        super().__init__(model, loss_fn, inner_lr, **kwargs)
        self.inner_data = inner_data
        self.inner_batch = inner_batch
        self.inner_adam = (InnerAdam(self.functional.params(), self.adapted_names)
                           if inner_optimizer == "adam" else None)

    @classmethod
    def option_arguments(cls, options: ReptileOptions) -> dict[str, Any]:
        return dict(inner_data=options.reptile_inner_data,
                    inner_batch=options.reptile_inner_batch,
                    inner_optimizer=options.reptile_inner_optimizer)

    def _minibatches(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """The tasks' inner data ``[tasks, n, ...]`` rearranged into the examples of the K
        minibatches in order, ``[tasks, K·b, ...]``: consecutive blocks of random permutations of
        the n examples (a fresh permutation whenever one is used up), drawn per task from
        torch's global generator (saved in checkpoints)."""
        assert self.inner_batch is not None
        tasks, n = y.shape[:2]
        needed = self.inner_steps * self.inner_batch
        epochs = -(-needed // n)
        order = torch.rand(tasks, epochs, n).argsort(dim=-1).reshape(tasks, -1)[:, :needed]
        order = order.to(y.device)

        def gather(t: Tensor) -> Tensor:
            index = order.reshape(tasks, needed, *([1] * (t.dim() - 2)))
            return t.gather(1, index.expand(tasks, needed, *t.shape[2:]))

        return map_inputs(gather, x), gather(y)

    @property
    def meta_gradient_first_order(self) -> bool:
        return True

    def _adam_adapt(self, x: Inputs, y: Tensor, params: Params, steps: int, t: int,
                    v: Params, block: int | None = None) -> tuple[list[Params], int, Params]:
        """[φ₀, …, φ_steps] of ``steps`` :class:`InnerAdam` steps from ``params`` and state
        (``t``, ``v``) on one task's data (step k on its k-th block of ``block`` examples, or on
        all of it), and the state after them."""
        buffers = self.functional.buffers()
        path = [params]
        for k in range(steps):
            part = slice(None) if block is None else slice(k * block, (k + 1) * block)
            xk, yk = map_inputs(lambda t_, part=part: t_[part], x), y[part]
            grads = inner_gradient(
                lambda p, xk=xk, yk=yk, k=k: self.loss(p, xk, yk, buffers, batch_statistics=True,
                                                       step=k, support=True),
                path[-1], self.adapted_names, first_order=True)
            phi, t, v = self.inner_adam.step(path[-1], grads, self.inner_lr, t, v)
            path.append({n: p.detach() for n, p in phi.items()})
        return path, t, v

    def meta_gradient(self, batch: TaskBatch) -> Tensor:
        sx, sy, qx, qy = tasks = task_tensors(batch)
        check_task_batch(*tasks)
        theta = {n: p.detach() for n, p in self.params().items()}

        if self.inner_data == "task":
            x, y = map_inputs(lambda s, q: torch.cat([s, q], dim=1), sx, qx), torch.cat([sy, qy], 1)
        else:
            x, y = sx, sy
        if self.inner_batch is not None:
            x, y = self._minibatches(x, y)

        if self.inner_adam is not None:
            return self._accumulate(theta, *self._adam_tasks(theta, x, y, qx, qy))

        def task(x: Inputs, y: Tensor, qx: Inputs, qy: Tensor) -> tuple[Params, Tensor]:
            if self.inner_batch is None:
                phi = self.adapt(x, y, first_order=True, params=theta)
            else:
                phi, b = theta, self.inner_batch
                for k in range(self.inner_steps):
                    block = slice(k * b, (k + 1) * b)
                    phi = self.adapt(map_inputs(lambda t, block=block: t[block], x),
                                     y[block], steps=1, first_order=True, params=phi)
            with torch.no_grad():
                return phi, self.loss(phi, qx, qy)

        phis, losses = per_task(task, (x, y, qx, qy), self.batching, self.model,
                                first_order=self.meta_gradient_first_order)
        return self._accumulate(theta, phis, losses)

    def _accumulate(self, theta: Params, phis: Params, losses: Tensor) -> Tensor:
        """Adds θ − meanᵢ φᵢ (``phis`` stacked over tasks) to ``.grad``; the mean loss."""
        for name, p in self.params().items():
            step = theta[name] - phis[name].mean(dim=0)
            p.grad = step if p.grad is None else p.grad + step
        return losses.mean()

    def _adam_tasks(self, theta: Params, x: Inputs, y: Tensor, qx: Inputs, qy: Tensor
                    ) -> tuple[Params, Tensor]:
        """φᵢ of each task in turn, the Adam state carried from one to the next and stored
        after the last; (φ stacked over tasks, the query losses at φᵢ)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("reptile_inner_optimizer 'adam' carries its state from task to "
                              "task, so its tasks cannot be split over processes; train it in "
                              "one process, or use reptile_inner_optimizer 'sgd'")
        assert self.inner_adam is not None
        t, v = self.inner_adam.state()
        phis, losses = [], []
        for xi, yi, qxi, qyi in task_slices((x, y, qx, qy)):
            path, t, v = self._adam_adapt(xi, yi, theta, self.inner_steps, t, v,
                                          self.inner_batch)
            phis.append(path[-1])
            with torch.no_grad():
                losses.append(self.loss(path[-1], qxi, qyi))
        self.inner_adam.store(t, v)
        return ({n: torch.stack([phi[n] for phi in phis]) for n in theta},
                torch.stack(losses))

    def evaluation_curve(self, batch: TaskBatch, max_steps: int, metric: MetricFn,
                         at: Sequence[int] | None = None) -> Tensor:
        """MAML's evaluation (plain steps of ``inner_lr`` on the support set); with
        ``inner_optimizer="adam"`` the steps are :class:`InnerAdam` ones, each task starting
        from a copy of the state meta-training has reached (which stays unchanged), as the
        paper's code evaluates."""
        if self.inner_adam is None:
            return super().evaluation_curve(batch, max_steps, metric, at)
        tasks = task_tensors(batch)
        check_task_batch(*tasks)
        steps = measured_steps(at, max_steps)
        theta = {n: p.detach() for n, p in self.params().items()}
        curves = []
        for sx, sy, qx, qy in task_slices(tasks):
            t, v = self.inner_adam.state()
            path, _, _ = self._adam_adapt(sx, sy, theta, steps[-1], t, v)
            with torch.no_grad():
                curves.append(torch.stack([metric(self.functional_forward(path[k], qx, step=k),
                                                  qy) for k in steps]))
        return torch.stack(curves).detach()
