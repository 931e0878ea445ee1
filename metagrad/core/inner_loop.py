"""The inner loop of MAML (Finn et al. 2017, Eq. 1), applied K times:

    θ'₀ = θ,    θ'ₖ₊₁ = θ'ₖ − α ⊙ ∇_θ' L_support(θ'ₖ)

Second order keeps the graph of every gradient so that ∇_θ L_query(θ'_K) is the exact
meta-gradient (Eq. 3). First order (FOMAML) treats each inner gradient as a constant: the
gradient is taken at a detached copy of θ'ₖ, so no graph of the inner backward is built at all,
yet θ'ₖ₊₁ still depends on θ (identity Jacobian) and on a learned α.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from torch import Tensor
from torch.func import grad

from metagrad.core.functional import Params

LearningRate = float | Tensor | Mapping[str, float | Tensor] | Callable[[int, str], float | Tensor]
"""α: one number; one value per parameter name (a scalar, or a tensor shaped like the parameter,
as in Meta-SGD); or a function ``(step, name) -> α`` (MAML++ per-step per-layer rates)."""


def learning_rate_at(lr: LearningRate, step: int, name: str) -> float | Tensor:
    if callable(lr):
        return lr(step, name)
    if isinstance(lr, Mapping):
        return lr[name]
    return lr


def gradient_step(loss_fn: Callable[[Params], Tensor], params: Params, names: Collection[str],
                  lr: LearningRate, step: int, first_order: bool) -> Params:
    """One step θ' = θ − α∇L(θ) on the parameters ``names``; the others pass through unchanged."""
    # First order: differentiate at a detached copy, so no graph of the inner backward is built.
    source = {n: p.detach() for n, p in params.items()} if first_order else params
    frozen = {n: p for n, p in source.items() if n not in names}

    def loss_of_adapted(sub: Params) -> Tensor:
        return loss_fn({**frozen, **sub})

    grads = grad(loss_of_adapted)({n: source[n] for n in names})
    new = {n: params[n] - learning_rate_at(lr, step, n) * grads[n] for n in names}
    return {**params, **new}


def inner_loop(loss_fn: Callable[[Params], Tensor], params: Params, *, steps: int, lr: LearningRate,
               first_order: bool = False, adapt: Collection[str] | None = None,
               trajectory: bool = False) -> Params | list[Params]:
    """K = ``steps`` gradient steps on ``loss_fn`` starting from ``params``.

    ``adapt`` names the parameters that move (default: all). With ``trajectory=True`` the list
    [θ'₀, …, θ'_K] is returned (for MAML++'s multi-step loss), else θ'_K.
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    names = list(params) if adapt is None else list(adapt)
    path = [params]
    for k in range(steps):
        path.append(gradient_step(loss_fn, path[-1], names, lr, k, first_order))
    return path if trajectory else path[-1]
