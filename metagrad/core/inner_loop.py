"""The inner loop of MAML (Finn et al. 2017, Eq. 1), applied K times:

    θ'₀ = θ,    θ'ₖ₊₁ = θ'ₖ − α ⊙ ∇_θ' L_support(θ'ₖ)

Second order keeps the graph of every gradient so that ∇_θ L_query(θ'_K) is the exact
meta-gradient (Eq. 3). First order (FOMAML) treats each inner gradient as a constant: the
gradient is taken at a detached copy of θ'ₖ, so no graph of the inner backward is built at all,
yet θ'ₖ₊₁ still depends on θ (identity Jacobian) and on a learned α.

Memory-saving mode (``checkpoint=True``, second order only): each step keeps only its inputs
(θ'ₖ and α), not the activations and inner-backward graph of the support loss; the meta-backward
recomputes one step at a time and returns its exact vector-Jacobian product: v − ∇²L(θ'ₖ)(α ⊙ v)
for θ'ₖ and −v ⊙ ∇L(θ'ₖ) for α (see :class:`_RecomputedStep`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import grad

from metagrad.core.functional import Params, functorch_transform_active

LearningRate = float | Tensor | Mapping[str, float | Tensor] | Callable[[int, str], float | Tensor]
"""α: one number; one value per parameter name (a scalar, or a tensor shaped like the parameter,
as in Meta-SGD); or a function ``(step, name) -> α`` (MAML++ per-step per-layer rates)."""


def learning_rate_at(lr: LearningRate, step: int, name: str) -> float | Tensor:
    if callable(lr):
        return lr(step, name)
    if isinstance(lr, Mapping):
        return lr[name]
    return lr


def inner_gradient(loss_fn: Callable[[Params], Tensor], params: Params, names: Collection[str],
                   first_order: bool) -> Params:
    """∇L(θ) with respect to the parameters ``names`` (the others held fixed). First order:
    taken at a detached copy of θ, so no graph of the inner backward is built. Second order:
    the gradient keeps its graph (``create_graph``) when grad mode is on.

    Outside any ``torch.func`` transform (tasks looped, not batched by ``vmap``) the gradient is
    ``torch.autograd.grad``'s: the same values as :func:`torch.func.grad` without functorch's
    per-operation dispatch layer. :func:`torch.func.grad` is used inside a transform, and in
    second order when grad mode is off (the step is then recomputed, see
    :class:`_RecomputedStep`) or a forward-mode AD level is active
    (``torch.autograd.grad(create_graph=True)`` does not propagate tangents through the step)."""
    source = {n: p.detach() for n, p in params.items()} if first_order else params
    frozen = {n: p for n, p in source.items() if n not in names}
    if not _autograd_applies(first_order):
        def loss_of_adapted(sub: Params) -> Tensor:
            return loss_fn({**frozen, **sub})

        return grad(loss_of_adapted)({n: source[n] for n in names})
    wrt = {n: source[n] if source[n].requires_grad else source[n].detach().requires_grad_()
           for n in names}
    with torch.enable_grad():
        loss = loss_fn({**frozen, **wrt})
    if not loss.requires_grad:  # L does not depend on θ: ∇L = 0, as torch.func.grad returns
        return {n: torch.zeros_like(t) for n, t in wrt.items()}
    grads = torch.autograd.grad(loss, list(wrt.values()), create_graph=not first_order,
                                allow_unused=True, materialize_grads=True)
    return dict(zip(wrt, grads, strict=True))


def _autograd_applies(first_order: bool) -> bool:
    """Whether :func:`inner_gradient` may use ``torch.autograd.grad``: no functorch transform
    active; in second order also grad mode on and no forward-mode AD level. Both are read from
    private torch state (present in the tested torch 2.13); a torch without it gets
    :func:`torch.func.grad`, which is right in every case, only slower."""
    if functorch_transform_active():
        return False
    try:
        forward_level = forward_ad._current_level
    except AttributeError:
        return False
    return first_order or (torch.is_grad_enabled() and forward_level < 0)


def gradient_step(loss_fn: Callable[[Params], Tensor], params: Params, names: Collection[str],
                  lr: LearningRate, step: int, first_order: bool) -> Params:
    """One step θ' = θ − α∇L(θ) on the parameters ``names``; the others pass through unchanged."""
    grads = inner_gradient(loss_fn, params, names, first_order)
    new = {n: params[n] - learning_rate_at(lr, step, n) * grads[n] for n in names}
    return {**params, **new}


class _RecomputedStep(torch.autograd.Function):
    """One second-order inner step whose graph is not kept: ``forward`` computes
    θ'ₖ₊₁ = θ'ₖ − α ∇L(θ'ₖ) without recording anything and saves only its inputs; ``backward``
    re-runs the step with the graph of ∇L (deterministically: same inputs, same random state) and
    back-propagates the incoming gradient through it, which is exactly the vector-Jacobian product
    of the step. Only one step's graph is alive at a time during the meta-backward.

    ``once_differentiable``: the meta-gradient itself cannot be differentiated again (asking for
    it raises an error instead of returning a wrong value)."""

    @staticmethod
    def forward(ctx, run: Callable[..., tuple[Tensor, ...]], *inputs: Tensor  # type: ignore[override]
                ) -> tuple[Tensor, ...]:
        ctx.run = run
        ctx.rng_state = torch.get_rng_state()
        ctx.save_for_backward(*inputs)
        return run(*inputs)  # grad mode is off here: torch.func.grad still differentiates

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex())
                  for t in ctx.saved_tensors]
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng_state)
            outputs = ctx.run(*inputs)
        _refuse_closure_leaves(outputs, inputs)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        grads = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs,
                                    allow_unused=True, materialize_grads=True)
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return (None, *result)


def _refuse_closure_leaves(outputs: tuple[Tensor, ...], inputs: list[Tensor]) -> None:
    """The recomputed graph may only reach the step's own inputs: a tensor needing gradients
    that the loss read from its closure would silently get no gradient through the step."""
    own = {id(t) for t in inputs}
    seen: set[torch.autograd.graph.Node] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own:
            raise RuntimeError(
                "checkpointed inner step: the support loss uses a tensor that needs gradients "
                f"(shape {tuple(variable.shape)}) but is not a parameter of the step; pass it in "
                "params, or use checkpoint=False")
        stack.extend(n for n, _ in node.next_functions if n is not None)


def recomputed_gradient_step(loss_fn: Callable[[Params], Tensor], params: Params,
                             names: Collection[str], lr: LearningRate, step: int) -> Params:
    """The second-order :func:`gradient_step`, identical in value and meta-gradient, whose
    activations are recomputed during the backward pass instead of stored.

    The step is differentiated with respect to ``params`` and the tensor rates α only: tensors
    that ``loss_fn`` reads from its closure must not need gradients (data, buffers), else their
    gradient through this step would be lost (the backward pass raises an error)."""
    names = list(names)
    keys = list(params)
    rates = {n: learning_rate_at(lr, step, n) for n in names}
    rate_names = [n for n in names if isinstance(rates[n], Tensor)]

    def run(*flat: Tensor) -> tuple[Tensor, ...]:
        p = dict(zip(keys, flat[:len(keys)], strict=True))
        r = {**rates, **dict(zip(rate_names, flat[len(keys):], strict=True))}
        new = gradient_step(loss_fn, p, names, r, step, first_order=False)
        return tuple(new[n] for n in names)

    flat = [params[k] for k in keys] + [rates[n] for n in rate_names]  # type: ignore[misc]
    new = _RecomputedStep.apply(run, *flat)
    return {**params, **dict(zip(names, new, strict=True))}


def inner_loop(loss_fn: Callable[..., Tensor], params: Params, *, steps: int, lr: LearningRate,
               first_order: bool = False, adapt: Collection[str] | None = None,
               trajectory: bool = False, checkpoint: bool = False,
               step_aware: bool = False) -> Params | list[Params]:
    """K = ``steps`` gradient steps on ``loss_fn`` starting from ``params``.

    ``adapt`` names the parameters that move (default: all). With ``trajectory=True`` the list
    [θ'₀, …, θ'_K] is returned (for MAML++'s multi-step loss), else θ'_K. ``checkpoint=True``
    (second order, with gradients enabled): the steps' activations are recomputed during the
    backward pass instead of stored (:func:`recomputed_gradient_step`); it has no effect in
    first order, which keeps no inner graph. ``step_aware=True``: ``loss_fn(params, step=k)`` is
    called with the index k of the step it serves (the loss at θ'ₖ, k = 0..K-1; MAML++'s per-step
    BatchNorm), also when the step is recomputed.
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    names = list(params) if adapt is None else list(adapt)
    recompute = checkpoint and not first_order and torch.is_grad_enabled()
    path = [params]
    for k in range(steps):
        step_loss = functools.partial(loss_fn, step=k) if step_aware else loss_fn
        if recompute:
            path.append(recomputed_gradient_step(step_loss, path[-1], names, lr, k))
        else:
            path.append(gradient_step(step_loss, path[-1], names, lr, k, first_order))
    return path if trajectory else path[-1]
