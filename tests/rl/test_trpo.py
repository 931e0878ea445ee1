"""TRPO building blocks: conjugate gradient, Hessian-vector products, line search."""

import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.rl.trpo import (
    conjugate_gradient,
    flatten,
    hessian_vector_product,
    line_search,
    trpo_step,
    unflatten,
)

DT = torch.float64


def spd_matrix(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    return a @ a.T + n * torch.eye(n, dtype=DT)


def test_conjugate_gradient_matches_exact_solve():
    a = spd_matrix(8)
    b = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=DT)
    x, _ = conjugate_gradient(lambda v: a @ v, b, iters=8)  # n iterations: exact (exact arith.)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    few, residual = conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert (few - torch.linalg.solve(a, b)).norm() > 1e-6  # the iteration count is honoured
    torch.testing.assert_close(residual, b - a @ few)  # the returned residual is b − Ax
    assert residual.norm() > 1e-6


def test_flatten_round_trip():
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    back = unflatten(flatten(params), params)
    assert list(back) == ["w", "b"]
    for n in params:
        torch.testing.assert_close(back[n], params[n])
    with pytest.raises(ConfigError):
        unflatten(torch.zeros(5), params)


def cubic(p):
    """A non-quadratic function whose Hessian depends on the point."""
    w, b = p["w"], p["b"]
    return (w ** 3).sum() + (w.sum() * b).square().sum() + torch.sin(b).sum()


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_hessian_vector_product_matches_full_hessian(mode):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, generator=g, dtype=DT, requires_grad=True),
              "b": torch.randn(2, generator=g, dtype=DT, requires_grad=True)}
    v = torch.randn(5, generator=g, dtype=DT)

    def flat_fn(x):
        return cubic(unflatten(x, params))

    hessian = torch.autograd.functional.hessian(flat_fn, flatten(params).detach())
    hvp = hessian_vector_product(cubic, params, mode=mode, damping=0.1)
    tol = 1e-9 if mode == "exact" else 1e-6
    torch.testing.assert_close(hvp(v), hessian @ v + 0.1 * v, rtol=tol, atol=tol)


def test_hessian_vector_product_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="finite_difference"):
        hessian_vector_product(cubic, {"w": torch.zeros(1)}, mode="fisher")
    with pytest.raises(ConfigError, match="ComposedKL"):  # Gauss-Newton needs the KL's outputs
        hessian_vector_product(cubic, {"w": torch.zeros(1)}, mode="gauss_newton")


def test_line_search_needs_improvement_and_small_kl():
    params = {"x": torch.tensor([1.0], dtype=DT)}

    def objective(p):  # loss (x - 0)², "KL" grows with the distance moved from 1
        return p["x"].square().sum(), (p["x"] - 1).square().sum()

    full_step = torch.tensor([1.0], dtype=DT)  # KL of fraction f is f²
    result = line_search(objective, params, full_step, 1.0, max_kl=0.1, steps=15, backtrack=0.8)
    assert result.accepted and result.kl <= 0.1 and result.loss_after < 1.0
    assert result.step_fraction == pytest.approx(0.8 ** 6)  # first fraction with f² ≤ 0.1
    uphill = line_search(objective, params, -full_step, 1.0, max_kl=10.0)
    assert not uphill.accepted and uphill.params["x"].item() == 1.0


def test_trpo_step_on_quadratic_respects_trust_region():
    a = spd_matrix(4)
    target = torch.ones(4, dtype=DT)
    theta0 = torch.zeros(4, dtype=DT)
    params = {"x": theta0.clone().requires_grad_()}

    def objective(p):
        d = p["x"] - theta0
        return ((p["x"] - target) ** 2).sum(), 0.5 * d @ a @ d  # KL with Fisher a

    result = trpo_step(objective, params, max_kl=0.01, cg_iters=4, cg_damping=0.0)
    d = result.params["x"] - theta0
    assert result.accepted and result.step_fraction == 1.0
    assert 0.5 * d @ a @ d == pytest.approx(0.01, rel=1e-6)  # the full step lands on the boundary
    grad = 2 * (theta0 - target)
    torch.testing.assert_close(d / d.norm(), -torch.linalg.solve(a, grad) /
                               torch.linalg.solve(a, grad).norm())


def test_trpo_step_uses_the_given_curvature_for_the_metric():
    """A curvature function (e.g. the KL of a data subsample) sets the step's metric; the line
    search still checks the objective's own KL."""
    a, b = spd_matrix(4), spd_matrix(4, seed=5)
    target, theta0 = torch.ones(4, dtype=DT), torch.zeros(4, dtype=DT)
    params = {"x": theta0.clone().requires_grad_()}

    def objective(p):
        d = p["x"] - theta0
        return ((p["x"] - target) ** 2).sum(), 0.5 * d @ a @ d

    def curvature(p):
        d = p["x"] - theta0
        return 0.5 * d @ (4 * b) @ d

    result = trpo_step(objective, params, max_kl=0.01, cg_iters=4, cg_damping=0.0,
                       curvature=curvature)
    d = result.params["x"] - theta0
    assert result.accepted
    assert 0.5 * d @ (4 * b) @ d == pytest.approx(0.01 * result.step_fraction ** 2, rel=1e-6)
    step = torch.linalg.solve(b, 2 * (theta0 - target))
    torch.testing.assert_close(d / d.norm(), -step / step.norm())
    assert result.kl == pytest.approx(float(0.5 * d @ a @ d), rel=1e-6) and result.kl <= 0.01
