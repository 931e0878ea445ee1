"""The MAML-RL meta-objective: policy, meta-gradient and Hessian-vector products through one and
two adaptation steps, against central finite differences in float64."""

import pytest
import torch
from torch.distributions import kl_divergence

from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.objectives import OldPolicy, TaskData, adapt, meta_objective
from metagrad.rl.sampler import Episodes, action_distribution
from metagrad.rl.trpo import flatten, hessian_vector_product, unflatten

DT = torch.float64


def tiny_policy() -> GaussianMLPPolicy:
    torch.manual_seed(0)
    return GaussianMLPPolicy(2, 2, hidden=(5,), init_std=0.7).to(DT)


def fixed_task_data(seed: int, tasks: int = 2, rollouts: int = 2, T: int = 4) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    masks = torch.ones(tasks, rollouts, T, dtype=DT)
    masks[0, 1, 2:] = 0.0
    episodes = Episodes(
        obs=torch.randn(tasks, rollouts, T, 2, generator=g, dtype=DT),
        actions=torch.randn(tasks, rollouts, T, 2, generator=g, dtype=DT),
        rewards=torch.randn(tasks, rollouts, T, generator=g, dtype=DT) * masks,
        masks=masks,
    )
    return TaskData(episodes, torch.randn(tasks, rollouts, T, generator=g, dtype=DT) * masks)


def test_policy_functional_call_and_self_kl():
    policy = tiny_policy()
    obs = torch.randn(7, 2, dtype=DT)
    params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        own, functional = policy(obs), policy.distribution(obs, params)
    torch.testing.assert_close(own.loc, functional.loc)
    assert float(kl_divergence(own, functional).sum(-1).abs().max()) == 0.0
    params["log_std"] = params["log_std"] + 0.1
    assert float(kl_divergence(own, policy.distribution(obs, params)).sum(-1).min()) > 0
    actions = torch.randn(7, 2, dtype=DT)
    by_hand = (-0.5 * ((actions - own.loc) / own.scale) ** 2 - own.scale.log()
               - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=DT))).sum(-1)
    torch.testing.assert_close(policy.log_prob(obs, actions), by_hand)


def problem(first_order: bool = False, steps: int = 1, lr: float = 0.5):
    """θ ↦ meta-objective through ``steps`` adaptation steps, step k on its own fixed episodes;
    π_old is the policy those steps reach from θ (so the KL is 0 there)."""
    policy = tiny_policy()
    params = dict(policy.named_parameters())
    pre, post = [fixed_task_data(1 + 2 * k) for k in range(steps)], fixed_task_data(2)
    adapted = {n: p.detach() for n, p in params.items()}
    for k, data in enumerate(pre):  # a large α makes the second-order terms visible
        adapted = adapt(policy, adapted, data, lr=lr, per_task=k > 0)
    loc, scale = action_distribution(policy, adapted, post.episodes.obs, per_task=True)
    log_prob = torch.distributions.Normal(loc, scale).log_prob(post.episodes.actions).sum(-1)
    old = OldPolicy(log_prob.detach(), loc.detach(), scale.detach())

    return params, meta_objective(policy, pre, post, old, lr=lr, first_order=first_order)


def finite_difference_gradient(fn, params, eps=1e-6):
    x0 = flatten({n: p.detach() for n, p in params.items()})
    grad = torch.zeros_like(x0)
    for j in range(len(x0)):
        e = torch.zeros_like(x0)
        e[j] = eps
        grad[j] = (fn(unflatten(x0 + e, params)) - fn(unflatten(x0 - e, params))) / (2 * eps)
    return grad


STEPS_AND_RATES = [(1, 0.5), (2, 0.1)]  # two steps of 0.5 shrink a std to e^-7.6: ill-posed


@pytest.mark.parametrize(("steps", "lr"), STEPS_AND_RATES)
def test_meta_gradient_matches_finite_differences(steps, lr):
    params, objective = problem(steps=steps, lr=lr)
    loss, kl = objective(params)
    autograd = flatten(dict(zip(params, torch.autograd.grad(loss, list(params.values())),
                                strict=True)))
    numeric = finite_difference_gradient(lambda p: objective(p)[0], params)
    torch.testing.assert_close(autograd, numeric, rtol=1e-6, atol=1e-8)
    assert float(kl.detach()) == pytest.approx(0.0, abs=1e-14)  # the old policy is the current one

    first_params, first_order = problem(first_order=True, steps=steps, lr=lr)
    fo_loss, _ = first_order(first_params)
    fo = flatten(dict(zip(first_params, torch.autograd.grad(fo_loss, list(
        first_params.values())), strict=True)))
    assert (fo - numeric).abs().max() > 1e-3  # the second-order term matters here


@pytest.mark.parametrize(("steps", "lr"), STEPS_AND_RATES)
def test_meta_kl_hessian_vector_product_matches_finite_differences(steps, lr):
    params, objective = problem(steps=steps, lr=lr)
    v = torch.randn(sum(p.numel() for p in params.values()),
                    generator=torch.Generator().manual_seed(3), dtype=DT)
    exact = hessian_vector_product(lambda p: objective(p)[1], params, mode="exact", damping=0.0)
    fd = hessian_vector_product(lambda p: objective(p)[1], params, mode="finite_difference",
                                damping=0.0, fd_eps=1e-5)
    hv = exact(v)
    assert hv.norm() > 1e-3
    torch.testing.assert_close(hv, fd(v), rtol=1e-6, atol=1e-8)
    # and against a fully numeric second derivative of the KL along v
    x0 = flatten({n: p.detach() for n, p in params.items()})
    eps = 1e-4

    def kl_at(x):
        return objective(unflatten(x, params))[1]

    curvature = (kl_at(x0 + eps * v) - 2 * kl_at(x0) + kl_at(x0 - eps * v)) / eps ** 2
    assert float(v @ hv) == pytest.approx(float(curvature), rel=1e-5)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(("steps", "lr"), STEPS_AND_RATES)
def test_gauss_newton_products_equal_the_exact_kl_hessian(steps, lr, first_order):
    """At θ_old, Jᵀ∇²D(Jv) (forward-mode Jv through the adaptation steps, no double backward)
    is the KL's Hessian times v, on all tasks and on a subset."""
    params, objective = problem(first_order=first_order, steps=steps, lr=lr)
    v = torch.randn(sum(p.numel() for p in params.values()),
                    generator=torch.Generator().manual_seed(4), dtype=DT)
    for tasks in (None, [1]):
        kl = objective.kl(tasks)
        exact = hessian_vector_product(kl, params, mode="exact", damping=0.0)(v)
        gauss_newton = hessian_vector_product(kl, params, mode="gauss_newton", damping=0.0)
        assert exact.norm() > 1e-3
        torch.testing.assert_close(gauss_newton(v), exact, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gauss_newton(2 * v), 2 * exact, rtol=1e-9, atol=1e-12)


def test_two_steps_adapt_on_their_own_episodes():
    """Step 2 descends the loss of the second episode set: not the same as two steps on the
    first set, nor one step."""
    policy = tiny_policy()
    params = dict(policy.named_parameters())
    first, second, post = fixed_task_data(1), fixed_task_data(3), fixed_task_data(2)
    old = OldPolicy(torch.zeros(2, 2, 4, dtype=DT), torch.zeros(2, 2, 4, 2, dtype=DT),
                    torch.ones(2, 2, 4, 2, dtype=DT))

    def loss(pre):
        return meta_objective(policy, pre, post, old, lr=0.1, first_order=False)(params)[0]

    two = loss([first, second])
    assert not torch.allclose(two, loss([first, first]))
    assert not torch.allclose(two, loss([first]))
