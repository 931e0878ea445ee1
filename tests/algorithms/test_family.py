"""The MAML family: each algorithm checked against its defining equation."""

import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from gradcheck import central_differences
from torch import nn

from metagrad import MAML
from metagrad.algorithms.anil import ANIL
from metagrad.algorithms.cavia import CAVIA
from metagrad.algorithms.imaml import IMAML
from metagrad.algorithms.mamlpp import MAMLpp, multi_step_weights
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.algorithms.reptile import Reptile
from metagrad.core.inner_loop import inner_loop
from metagrad.core.solvers import conjugate_gradient, guarded_conjugate_gradient
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError
from metagrad.models.mlp import MLP
from metagrad.tasks.sinusoid import SinusoidTasks

DT = torch.float64


def tasks(n=3, shots=6, queries=7, dim=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n, shots, dim, generator=g, dtype=DT)
    qx = torch.randn(n, queries, dim, generator=g, dtype=DT)
    w = torch.randn(n, dim, 1, generator=g, dtype=DT)
    return TaskBatch(sx, torch.sin(sx @ w), qx, torch.sin(qx @ w))


def mlp(sizes=(1, 8, 8, 1), seed=0):
    torch.manual_seed(seed)
    return MLP(list(sizes)).to(DT)


def grads_of(learner, batch):
    learner.zero_grad()
    learner.meta_gradient(batch)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def test_metasgd_inner_rate_gradients_match_finite_differences():
    learner = MetaSGD(mlp((1, 3, 1)), F.mse_loss, inner_lr=0.1, inner_steps=2)
    with torch.no_grad():
        for r in learner.inner_rates.parameters():
            r.uniform_(0.05, 0.2)
    batch = tasks()
    learner.zero_grad()
    learner.meta_loss(*batch.tensors()).backward()
    rates = list(learner.inner_rates.parameters())
    analytic = torch.cat([r.grad.reshape(-1) for r in rates])
    numeric = central_differences(lambda: learner.meta_loss(*batch.tensors()), rates)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)
    assert analytic.abs().max() > 1e-4


def test_mamlpp_with_every_switch_off_is_maml():
    batch = tasks()
    model = mlp()
    plain = MAML(copy.deepcopy(model), F.mse_loss, inner_lr=0.05, inner_steps=3)
    pp = MAMLpp(copy.deepcopy(model), F.mse_loss, inner_lr=0.05, inner_steps=3,
                multi_step_loss=False, learn_step_lrs=False, first_order_epochs=0)
    a, b = grads_of(plain, batch), grads_of(pp, batch)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_mamlpp_multi_step_loss_is_the_weighted_sum_by_hand():
    batch = tasks()
    pp = MAMLpp(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=3, multi_step_loss=True,
                msl_epochs=10, learn_step_lrs=False, iterations_per_epoch=2)
    pp.iteration.fill_(6)  # epoch 3
    w = multi_step_weights(3, 3, 10)
    assert w[0] == pytest.approx(1 / 3 - 3 / 30) and sum(w) == pytest.approx(1.0)
    plain = MAML(pp.model, F.mse_loss, inner_lr=0.05, inner_steps=3)
    by_hand = sum(wk * plain.meta_loss(*batch.tensors(), steps=k + 1) for k, wk in enumerate(w))
    torch.testing.assert_close(pp.meta_loss(*batch.tensors()), by_hand)
    pp.iteration.fill_(20)  # epoch 10: annealing over, last step only
    torch.testing.assert_close(pp.meta_loss(*batch.tensors()), plain.meta_loss(*batch.tensors()))


def test_mamlpp_switches_derivative_order_at_the_configured_epoch():
    batch = tasks()
    pp = MAMLpp(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, multi_step_loss=False,
                learn_step_lrs=False, first_order_epochs=2, iterations_per_epoch=3)
    fo = MAML(pp.model, F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=True)
    so = MAML(pp.model, F.mse_loss, inner_lr=0.05, inner_steps=2)
    for it in range(8):
        got = grads_of(pp, batch)
        ref = grads_of(fo if it < 6 else so, batch)
        for k in ref:
            torch.testing.assert_close(got[f"model.{k}"] if f"model.{k}" in got else got[k], ref[k])
    assert int(pp.iteration) == 8


def test_mamlpp_learns_per_layer_per_step_rates():
    pp = MAMLpp(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=3, multi_step_loss=False)
    rates = dict(pp.inner_rates.named_parameters())
    assert all(r.shape == (3,) for r in rates.values()) and len(rates) == 6
    g = grads_of(pp, tasks())
    assert all(g[f"inner_rates.{n}"].abs().sum() > 0 for n in rates)


def test_anil_keeps_the_body_and_equals_maml_restricted_to_the_head():
    batch = tasks()
    model = mlp()
    anil = ANIL(copy.deepcopy(model), F.mse_loss, inner_lr=0.1, inner_steps=2)
    head_only = MAML(copy.deepcopy(model), F.mse_loss, inner_lr=0.1, inner_steps=2, adapt="head")
    adapted = anil.adapt(batch.support_x[0], batch.support_y[0])
    for n, p in anil.params().items():
        assert torch.equal(adapted[n], p) != n.startswith("head."), n
    a, b = grads_of(anil, batch), grads_of(head_only, batch)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    assert a["model.fc0.weight"].abs().max() > 0  # the body learns through the head's adaptation


def sgd_by_hand(model, x, y, lr, steps):
    """φ: ``steps`` full-batch SGD steps on MSE(model(x), y) from a copy of ``model``."""
    phi = copy.deepcopy(model)
    opt = torch.optim.SGD(phi.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(phi(x), y).backward()
        opt.step()
    return dict(phi.named_parameters())


@pytest.mark.parametrize("inner_data", ["task", "support"])
def test_reptile_update_is_theta_plus_epsilon_mean_difference(inner_data):
    """Alg. 2 of the paper: φᵢ from k SGD steps on the task's data (its support and query sets
    together by default, as the paper's code trains on all of a task's data; or the support set
    only), then θ ← θ + ε · meanᵢ(φᵢ − θ), with φᵢ computed here by ``torch.optim.SGD``."""
    batch = tasks()
    model = mlp()
    reptile = Reptile(copy.deepcopy(model), F.mse_loss, inner_lr=0.05, inner_steps=3,
                      inner_data=inner_data)
    data = zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y, strict=True)
    phis = [sgd_by_hand(model, torch.cat([sx, qx]) if inner_data == "task" else sx,
                        torch.cat([sy, qy]) if inner_data == "task" else sy, 0.05, 3)
            for sx, sy, qx, qy in data]
    eps = 0.5
    opt = torch.optim.SGD(reptile.parameters(), lr=eps)
    opt.zero_grad()
    reptile.meta_gradient(batch)
    opt.step()
    theta = dict(model.named_parameters())
    for n, p in reptile.params().items():
        expected = theta[n] + eps * torch.stack([phi[n] - theta[n] for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
        assert not torch.equal(p.detach(), theta[n])


def test_reptile_minibatch_steps_are_sgd_on_consecutive_blocks_of_a_shuffled_task():
    """``inner_batch`` = b: step k is an SGD step on examples [k·b, (k+1)·b) of the task's
    support+query data in a random order, a new permutation once all n are used (here n = 13,
    b = 5, 4 steps: the 20 examples span two permutations). φᵢ by ``torch.optim.SGD`` on those
    blocks, the permutations drawn as documented from the same global seed."""
    batch = tasks()
    model = mlp()
    steps, b, lr, eps = 4, 5, 0.05, 0.5
    reptile = Reptile(copy.deepcopy(model), F.mse_loss, inner_lr=lr, inner_steps=steps,
                      inner_batch=b)
    torch.manual_seed(123)
    opt = torch.optim.SGD(reptile.parameters(), lr=eps)
    opt.zero_grad()
    reptile.meta_gradient(batch)
    opt.step()
    torch.manual_seed(123)
    n = batch.support_y.shape[1] + batch.query_y.shape[1]
    order = torch.rand(3, 2, n).argsort(-1).reshape(3, -1)
    phis = []
    for i, (sx, sy, qx, qy) in enumerate(zip(batch.support_x, batch.support_y, batch.query_x,
                                            batch.query_y, strict=True)):
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        phi = copy.deepcopy(model)
        sgd = torch.optim.SGD(phi.parameters(), lr=lr)
        for k in range(steps):
            idx = order[i, k * b:(k + 1) * b]
            sgd.zero_grad()
            F.mse_loss(phi(x[idx]), y[idx]).backward()
            sgd.step()
        phis.append(dict(phi.named_parameters()))
    theta = dict(model.named_parameters())
    for name, p in reptile.params().items():
        expected = theta[name] + eps * torch.stack([phi[name] - theta[name]
                                                    for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    full = grads_of(Reptile(mlp(), F.mse_loss, inner_lr=lr, inner_steps=steps), batch)
    mini = grads_of(Reptile(mlp(), F.mse_loss, inner_lr=lr, inner_steps=steps, inner_batch=b),
                    batch)
    assert any(not torch.allclose(full[k], mini[k]) for k in full)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="reptile_inner_batch must be a positive integer"):
            Reptile(mlp(), F.mse_loss, inner_batch=bad)


def test_reptile_inner_data_changes_the_update_and_is_checked():
    batch = tasks()
    grads = {data: grads_of(Reptile(mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2,
                                    inner_data=data), batch) for data in ("task", "support")}
    assert any(not torch.allclose(grads["task"][n], grads["support"][n]) for n in grads["task"])
    with pytest.raises(ConfigError, match="reptile_inner_data must be one of"):
        Reptile(mlp(), F.mse_loss, inner_data="query")


def test_reptile_adam_inner_steps_are_torch_adam_carried_from_task_to_task():
    """``inner_optimizer="adam"`` (the paper's code): φᵢ by ``torch.optim.Adam(betas=(0,
    0.999))`` on the same minibatch blocks, one optimizer for all tasks of two meta-iterations
    (its state carries over; only the weights restart from θ); evaluation adapts from a copy of
    that state and leaves it unchanged; the state is part of the checkpointed state."""
    batch = tasks()
    model = mlp()
    steps, b, lr, eps, n = 4, 5, 0.01, 0.5, 13
    reptile = Reptile(copy.deepcopy(model), F.mse_loss, inner_lr=lr, inner_steps=steps,
                      inner_batch=b, inner_optimizer="adam")
    outer = torch.optim.SGD(reptile.parameters(), lr=eps)
    reference = copy.deepcopy(model)
    adam = torch.optim.Adam(reference.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    data = list(zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                    strict=True))

    def load(weights):
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(weights[name])

    for iteration in range(2):
        torch.manual_seed(iteration)
        outer.zero_grad()
        reptile.meta_gradient(batch)
        outer.step()
        torch.manual_seed(iteration)
        order = torch.rand(3, 2, n).argsort(-1).reshape(3, -1)
        theta = {k: p.detach().clone() for k, p in reference.named_parameters()}
        phis = []
        for i, (sx, sy, qx, qy) in enumerate(data):
            x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
            load(theta)
            for k in range(steps):
                idx = order[i, k * b:(k + 1) * b]
                adam.zero_grad()
                F.mse_loss(reference(x[idx]), y[idx]).backward()
                adam.step()
            phis.append({k: p.detach().clone() for k, p in reference.named_parameters()})
        load({k: theta[k] + eps * torch.stack([phi[k] - theta[k] for phi in phis]).mean(0)
              for k in theta})
    for name, p in reference.named_parameters():
        torch.testing.assert_close(reptile.params()[name].detach(), p.detach(), rtol=1e-10,
                                   atol=1e-12)
    t, v = reptile.inner_adam.state()
    assert t == 2 * 3 * steps
    for name, p in reference.named_parameters():
        torch.testing.assert_close(v[name], adam.state[p]["exp_avg_sq"], rtol=1e-10, atol=1e-15)

    mse = lambda out, y: F.mse_loss(out, y)  # noqa: E731
    curve = reptile.evaluation_curve(batch, 3, mse)
    assert reptile.inner_adam.state()[0] == t
    saved = copy.deepcopy(adam.state_dict())
    theta = {k: p.detach().clone() for k, p in reference.named_parameters()}
    for i, (sx, sy, qx, qy) in enumerate(data):
        load(theta)
        adam.load_state_dict(copy.deepcopy(saved))
        expected = []
        for k in range(4):
            with torch.no_grad():
                expected.append(F.mse_loss(reference(qx), qy))
            if k < 3:
                adam.zero_grad()
                F.mse_loss(reference(sx), sy).backward()
                adam.step()
        torch.testing.assert_close(curve[i], torch.stack(expected), rtol=1e-10, atol=1e-12)
    assert curve[:, 3].mean() < curve[:, 0].mean()
    state = reptile.state_dict()
    assert int(state["inner_adam.t"]) == t
    fresh = Reptile(mlp(seed=1), F.mse_loss, inner_lr=lr, inner_optimizer="adam")
    fresh.load_state_dict(state)
    assert fresh.inner_adam.state()[0] == t
    with pytest.raises(ConfigError, match="reptile_inner_optimizer must be one of"):
        Reptile(mlp(), F.mse_loss, inner_optimizer="rmsprop")


def test_imaml_matches_the_analytic_ridge_regression_meta_gradient():
    """Linear model, L_s(φ) = ½‖Xφ − y‖²/n: φ*(θ) = (A + λI)⁻¹(b + λθ) with A = XᵀX/n, b = Xᵀy/n,
    and dL_q(φ*)/dθ = λ(A + λI)⁻¹ ∇L_q(φ*) exactly."""
    g = torch.Generator().manual_seed(0)
    d, lam = 4, 2.0
    model = nn.Linear(d, 1, bias=False).to(DT)
    X, y = torch.randn(20, d, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    Xq, yq = torch.randn(15, d, generator=g, dtype=DT), torch.randn(15, 1, generator=g, dtype=DT)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum() / out.shape[0]  # noqa: E731
    imaml = IMAML(model, loss, inner_lr=0.2, inner_steps=300, lam=lam, cg_iterations=d)
    batch = TaskBatch(X[None], y[None], Xq[None], yq[None])
    got = grads_of(imaml, batch)["model.weight"].reshape(-1)
    theta = model.weight.detach().reshape(-1)
    A, b = X.T @ X / 20, (X.T @ y).reshape(-1) / 20
    M = A + lam * torch.eye(d, dtype=DT)
    phi = torch.linalg.solve(M, b + lam * theta)
    grad_q = Xq.T @ (Xq @ phi - yq.reshape(-1)) / 15
    expected = lam * torch.linalg.solve(M, grad_q)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert (got - grad_q).abs().max() > 1e-3  # differs from the first-order gradient



def test_imaml_authors_code_variant_matches_its_recipe_computed_by_hand():
    """``inner="plain"`` with the damped CG system, on the linear model where H = XᵀX/n: K plain
    steps on L_s, one step of α on λ/2‖φ − θ‖², then ((1 + δ) I + H/(λ + λ_d))⁻¹ ∇L_q(φ);
    adaptation for evaluation is the plain steps alone."""
    g = torch.Generator().manual_seed(1)
    d, lam, lr, steps, delta, lam_d = 4, 2.0, 0.1, 5, 1.0, 10.0
    model = nn.Linear(d, 1, bias=False).to(DT)
    X, y = torch.randn(20, d, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    Xq, yq = torch.randn(15, d, generator=g, dtype=DT), torch.randn(15, 1, generator=g, dtype=DT)
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum() / out.shape[0]  # noqa: E731
    imaml = IMAML(model, loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_iterations=d,
                  inner="plain", cg_damping=delta, lambda_damping=lam_d)
    theta = model.weight.detach().reshape(-1)
    A, b = X.T @ X / 20, (X.T @ y).reshape(-1) / 20
    phi = theta.clone()
    for _ in range(steps):
        phi = phi - lr * (A @ phi - b)
    torch.testing.assert_close(imaml.adapt(X, y)["weight"].reshape(-1), phi)
    phi = phi - lr * lam * (phi - theta)
    grad_q = Xq.T @ (Xq @ phi - yq.reshape(-1)) / 15
    system = (1 + delta) * torch.eye(d, dtype=DT) + A / (lam + lam_d)
    expected = torch.linalg.solve(system, grad_q)
    got = grads_of(imaml, TaskBatch(X[None], y[None], Xq[None], yq[None]))["model.weight"]
    # CG stops at ‖r‖² ≤ 1e-10: agreement to ~1e-5 relative
    torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-4, atol=1e-6)
    paper = grads_of(IMAML(model, loss, inner_lr=lr, inner_steps=steps, lam=lam,
                           cg_iterations=d), TaskBatch(X[None], y[None], Xq[None], yq[None]))
    assert (paper["model.weight"].reshape(-1) - expected).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="imaml_inner must be one of"):
        IMAML(model, loss, inner="newton")
    with pytest.raises(ConfigError, match="imaml_cg_damping must be a finite number >= 0"):
        IMAML(model, loss, cg_damping=-1.0)


def test_imaml_matches_the_unrolled_gradient_once_the_inner_problem_is_solved():
    """Smooth network (tanh), float64: the implicit meta-gradient equals the second-order gradient
    unrolled through 300 inner steps on L_s(φ) + λ/2‖φ − θ‖² (θ differentiated through the
    proximal term too), which converges to it as the inner problem is solved."""
    batch = tasks(n=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 1)).to(DT)
    lam, lr, steps = 2.0, 0.1, 300
    imaml = IMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam, cg_iterations=100)
    got = grads_of(imaml, batch)

    theta = imaml.params()
    expected = {n: torch.zeros_like(p) for n, p in theta.items()}
    for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):
        def regularised(phi, sx=sx, sy=sy):
            prox = sum(((phi[n] - theta[n]) ** 2).sum() for n in theta)
            return imaml.loss(phi, sx, sy) + 0.5 * lam * prox

        phi = inner_loop(regularised, theta, steps=steps, lr=lr, first_order=False)
        query = imaml.loss(phi, qx, qy) / batch.num_tasks
        for n, g in zip(theta, torch.autograd.grad(query, list(theta.values())), strict=True):
            expected[n] += g
    # CG stops at ‖r‖² ≤ 1e-10: agreement to ~1e-5 relative
    for n in expected:
        torch.testing.assert_close(got[f"model.{n}"], expected[n], rtol=1e-4, atol=1e-6)
    first_order = grads_of(IMAML(model, F.mse_loss, inner_lr=lr, inner_steps=steps, lam=lam,
                                 cg_iterations=1), batch)
    assert max((first_order[k] - got[k]).abs().max() for k in got) > 1e-3


def test_guarded_conjugate_gradient_is_cg_on_spd_and_stays_downhill_on_indefinite_matrices():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))
    b = torch.randn(6, generator=g, dtype=DT)
    spd = q @ torch.diag(torch.tensor([0.5, 1, 2, 3, 4, 5], dtype=DT)) @ q.T
    torch.testing.assert_close(guarded_conjugate_gradient(lambda v: spd @ v, b, 6),
                               torch.linalg.solve(spd, b))
    torch.testing.assert_close(guarded_conjugate_gradient(lambda v: spd @ v, b, 3),
                               conjugate_gradient(lambda v: spd @ v, b, 3)[0])
    # I + H/λ with H below −λ in some direction (inner problem not at a minimum): plain CG
    # solves it exactly, and A⁻¹b points uphill (bᵀx < 0: the step would raise the query loss);
    # the guarded one stops at the negative curvature, still downhill.
    a = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=DT))
    b = torch.tensor([1.0, 0.0, 1.2], dtype=DT)
    plain = conjugate_gradient(lambda v: a @ v, b, 3)[0]
    torch.testing.assert_close(plain, torch.linalg.solve(a, b))
    assert b @ plain < 0
    guarded = guarded_conjugate_gradient(lambda v: a @ v, b, 3)
    assert b @ guarded > 0
    # b itself along negative curvature: the first-order direction b
    torch.testing.assert_close(guarded_conjugate_gradient(lambda v: a @ v, torch.tensor(
        [0.0, 0.0, 1.0], dtype=DT), 3), torch.tensor([0.0, 0.0, 1.0], dtype=DT))


def test_imaml_meta_gradient_points_downhill_on_untrained_sinusoid_tasks():
    """The configuration that did not learn (λ = 1, 10 steps of 0.02, untrained network):
    I + H/λ is indefinite on many tasks. Each task's meta-gradient must still be a descent
    direction for its query loss (positive inner product with ∇L_query(φ)); plain CG gave
    uphill vectors on several tasks, and a batch gradient at cosine −0.55 to the true one."""
    torch.manual_seed(0)
    imaml = IMAML(MLP([1, 40, 40, 1]), F.mse_loss, inner_lr=0.02, inner_steps=10, lam=1.0)
    batch = SinusoidTasks(10, 10).sample(25, torch.Generator().manual_seed(3))
    for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):
        implicit, _ = imaml.task_meta_gradient(sx, sy, qx, qy)
        phi = imaml.adapt(sx, sy)
        query = torch.func.grad(lambda p, qx=qx, qy=qy: imaml.loss(p, qx, qy))(phi)
        assert sum((implicit[n] * query[n]).sum() for n in query) > 0


def test_imaml_inner_solver_never_increases_the_regularised_loss():
    """A rate too large for the task's curvature (here 0.5 on sinusoid) makes plain gradient
    descent diverge; the monotone inner solver halves it instead, so training cannot reach NaN
    through the inner loop."""
    torch.manual_seed(0)
    imaml = IMAML(MLP([1, 40, 40, 1]), F.mse_loss, inner_lr=0.5, inner_steps=15, lam=2.0)
    batch = SinusoidTasks(10, 10).sample(4, torch.Generator().manual_seed(1))
    theta = imaml.params()
    for sx, sy in zip(batch.support_x, batch.support_y, strict=True):
        path = imaml.adapt(sx, sy, trajectory=True)
        values = [imaml.loss(p, sx, sy).item() + 0.5 * imaml.lam * sum(
            ((p[n] - theta[n]) ** 2).sum().item() for n in theta) for p in path]
        assert all(b <= a + 1e-6 for a, b in itertools.pairwise(values))
        assert values[-1] < values[0]
    assert torch.isfinite(imaml.meta_gradient(batch))


PEAK_MEMORY_SCRIPT = """
import resource, sys, torch, torch.nn.functional as F
from metagrad import MAML
from metagrad.algorithms.imaml import IMAML
from metagrad.errors import ConfigError
from metagrad.models.mlp import MLP
from metagrad.core.taskbatch import TaskBatch
torch.set_num_threads(1)
algo, steps = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 3000, 1, generator=g)
batch = TaskBatch(x, torch.sin(x), x, torch.cos(x))
cls = IMAML if algo == "imaml" else MAML
learner = cls(MLP([1, 128, 128, 1]), F.mse_loss, 0.01, 1)
learner.meta_gradient(batch)  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
learner.zero_grad()
learner.inner_steps = steps
learner.meta_gradient(batch)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _peak_kib(algo, steps):
    """Growth of the process's peak resident memory during one meta-gradient (KiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, algo, str(steps)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return int(out.stdout.split()[-1])


def test_imaml_memory_is_flat_in_inner_steps_while_maml_grows():
    """3000 points, width 128: MAML's unrolled graph keeps several MiB of activations per step."""
    imaml5, imaml50 = _peak_kib("imaml", 5), _peak_kib("imaml", 50)
    maml5, maml50 = _peak_kib("maml", 5), _peak_kib("maml", 50)
    assert maml50 > 3 * max(maml5, 1024)  # MAML grows with the steps
    # iMAML: flat up to allocator noise, under 10% of what MAML adds over the same steps
    assert imaml50 - imaml5 < 0.1 * (maml50 - maml5)


def test_cavia_adapts_only_the_context_and_resets_it_per_task():
    batch = tasks(n=2)
    net = mlp((1 + 3, 8, 1))
    cavia = CAVIA(net, F.mse_loss, inner_lr=1.0, context_dim=3, inner_steps=2)
    before = {n: p.clone() for n, p in cavia.params().items()}
    first = cavia.adapt(batch.support_x[0], batch.support_y[0])
    second = cavia.adapt(batch.support_x[1], batch.support_y[1])
    fresh = CAVIA(copy.deepcopy(net), F.mse_loss, inner_lr=1.0, context_dim=3, inner_steps=2)
    again = fresh.adapt(batch.support_x[1], batch.support_y[1])
    for n, p in cavia.params().items():
        assert torch.equal(p, before[n])
        if n != "context":
            assert torch.equal(first[n], p)
    assert first["context"].abs().sum() > 0 and torch.equal(cavia.params()["context"], torch.zeros(3, dtype=DT))
    torch.testing.assert_close(second["context"], again["context"])
    g = grads_of(cavia, batch)
    assert "context" not in g and g["model.model.fc0.weight"].abs().sum() > 0
