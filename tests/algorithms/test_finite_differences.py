"""Analytic meta-gradients against central finite differences (float64) for the parts of the
family that had no such check: CAVIA's meta-gradient through the context step, and MAML++'s
learned per-layer per-step inner rates (LSLR) under the multi-step loss."""

import pytest
import torch
import torch.nn.functional as F
from gradcheck import central_differences

from metagrad.algorithms.cavia import CAVIA
from metagrad.algorithms.mamlpp import MAMLpp, multi_step_weights
from metagrad.core.taskbatch import TaskBatch
from metagrad.models.mlp import MLP

DT = torch.float64


def sine_tasks(n=3, shots=5, queries=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=g, dtype=DT)
    phase = torch.pi * torch.rand(n, 1, 1, generator=g, dtype=DT)
    sx = 10 * torch.rand(n, shots, 1, generator=g, dtype=DT) - 5
    qx = 10 * torch.rand(n, queries, 1, generator=g, dtype=DT) - 5
    return TaskBatch(sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase))


def analytic(learner, batch, params):
    learner.zero_grad()
    learner.meta_loss(*batch.tensors()).backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("first_order", [False, True])
def test_cavia_meta_gradient_matches_finite_differences(first_order):
    torch.manual_seed(0)
    learner = CAVIA(MLP([1 + 2, 6, 6, 1]).to(DT), F.mse_loss, inner_lr=0.5, context_dim=2,
                    inner_steps=2, first_order=first_order)
    batch = sine_tasks()
    theta = [p for n, p in learner.named_parameters() if p.requires_grad]
    assert theta and all("context" not in n for n, p in learner.named_parameters()
                         if p.requires_grad)
    got = analytic(learner, batch, theta)
    if first_order:
        # first order: θ' = θ (only φ moves), so ∂/∂θ holds φ' fixed: differentiate the query
        # loss at the adapted context with θ moving alone
        context = learner.model.context
        phis = [learner.adapt(sx, sy)["context"].detach() for sx, sy in
                zip(batch.support_x, batch.support_y, strict=True)]

        def query_loss_at_adapted_context():
            total = 0
            for phi, qx, qy in zip(phis, batch.query_x, batch.query_y, strict=True):
                with torch.no_grad():
                    context.copy_(phi)
                total = total + F.mse_loss(learner.model(qx), qy)
            with torch.no_grad():
                context.zero_()
            return total / batch.num_tasks

        numeric = central_differences(query_loss_at_adapted_context, theta)
    else:
        numeric = central_differences(lambda: learner.meta_loss(*batch.tensors()), theta)
    torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-8)
    assert got.abs().max() > 1e-3
    # the context is reset per task and never meta-learned
    assert learner.model.context.grad is None
    assert torch.equal(learner.model.context, torch.zeros(2, dtype=DT))


def test_cavia_context_follows_the_model_dtype():
    """CAVIA(model.to(float64)) adapted its context in float32: the meta-loss then carries float32
    round-off (its finite differences are off by 5e-4 at ε=1e-6, growing as ε shrinks)."""
    learner = CAVIA(MLP([1 + 2, 6, 1]).to(DT), F.mse_loss, context_dim=2)
    batch = sine_tasks()
    assert learner.adapt(batch.support_x[0], batch.support_y[0])["context"].dtype == DT


@pytest.mark.parametrize("multi_step_loss", [True, False])
def test_mamlpp_per_step_rates_match_finite_differences(multi_step_loss):
    torch.manual_seed(0)
    steps = 3
    learner = MAMLpp(MLP([1, 6, 6, 1]).to(DT), F.mse_loss, inner_lr=0.01, inner_steps=steps,
                     multi_step_loss=multi_step_loss, msl_epochs=10, iterations_per_epoch=2)
    learner.iteration.fill_(5)  # epoch 2: multi-step weights neither uniform nor final
    if multi_step_loss:
        assert learner.step_weights(steps) == multi_step_weights(steps, 2, 10)
        assert len(set(learner.step_weights(steps))) == 2
    with torch.no_grad():  # distinct rates per step and per tensor, so a mixed-up index shows
        for i, rate in enumerate(learner.inner_rates.parameters()):
            rate.copy_(torch.log(0.01 * torch.arange(1, steps + 1, dtype=DT) * (1 + 0.3 * i)))
    rates = list(learner.inner_rates.parameters())
    assert all(r.shape == (steps,) for r in rates)
    theta = list(learner.model.parameters())
    batch = sine_tasks()
    got = analytic(learner, batch, rates + theta)
    numeric = central_differences(lambda: learner.meta_loss(*batch.tensors()), rates + theta)
    torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-9)
    rate_grads = got[:sum(r.numel() for r in rates)]
    assert (rate_grads.abs() > 1e-6).all(), rate_grads  # every step's rate is used
    # the trainer's path (meta_gradient: task-by-task backward) gives the same gradients
    learner.zero_grad()
    learner.meta_gradient(batch)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in rates + theta]), got,
                               rtol=1e-10, atol=1e-12)
