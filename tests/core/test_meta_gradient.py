"""The meta-gradient of MAML checked against independent references."""

import pytest
import torch
import torch.nn.functional as F
from gradcheck import central_differences as finite_differences
from torch import nn

from metagrad import MAML

DT = torch.float64


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def regression_tasks(tasks=3, shots=5, queries=6):
    g = torch.Generator().manual_seed(1)
    sx = torch.rand(tasks, shots, 1, generator=g, dtype=DT) * 4 - 2
    qx = torch.rand(tasks, queries, 1, generator=g, dtype=DT) * 4 - 2
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=DT) + 0.5
    return sx, amp * torch.sin(sx), qx, amp * torch.sin(qx)


def unrolled_reference(model, loss_fn, lr, steps, sx, sy, qx, qy, first_order=False):
    """Plain autograd: per task, K steps of θ − α ∇L with create_graph, then the query loss."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    losses = []
    for i in range(sx.shape[0]):
        fast = list(theta)
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (sx[i],))
            grads = torch.autograd.grad(loss_fn(out, sy[i]), fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads)]
        out = torch.func.functional_call(model, dict(zip(names, fast)), (qx[i],))
        losses.append(loss_fn(out, qy[i]))
    return torch.autograd.grad(torch.stack(losses).mean(), theta)


def flat_grad(maml, data, steps=None):
    maml.zero_grad()
    maml.meta_loss(*data, steps=steps).backward()
    return torch.cat([p.grad.reshape(-1) for p in maml.parameters()])


def central_differences(maml, data, steps):
    return finite_differences(lambda: maml.meta_loss(*data, steps=steps),
                              list(maml.parameters()))


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_finite_differences(steps, batching):
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    maml = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=steps, batching=batching)
    data = regression_tasks()
    analytic = flat_grad(maml, data)
    numeric = central_differences(maml, data, steps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_unrolled_autograd(steps, batching):
    model = small_mlp()
    maml = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=steps, batching=batching)
    data = regression_tasks()
    ours = flat_grad(maml, data)
    ref = torch.cat([g.reshape(-1) for g in unrolled_reference(model, F.mse_loss, 0.05, steps, *data)])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # the exact meta-gradient is not the first-order one: the test can tell them apart
    ref_fo = unrolled_reference(model, F.mse_loss, 0.05, steps, *data, first_order=True)
    assert (ours - torch.cat([g.reshape(-1) for g in ref_fo])).abs().max() > 1e-6


def test_first_order_equals_query_gradient_at_adapted_params():
    model = small_mlp()
    maml = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2, first_order=True)
    sx, sy, qx, qy = regression_tasks(tasks=1)
    ours = flat_grad(maml, (sx, sy, qx, qy))
    adapted = {n: p.detach().requires_grad_() for n, p in maml.adapt(sx[0], sy[0]).items()}
    loss = F.mse_loss(torch.func.functional_call(model, adapted, (qx[0],)), qy[0])
    ref = torch.autograd.grad(loss, list(adapted.values()))
    torch.testing.assert_close(ours, torch.cat([g.reshape(-1) for g in ref]))


def test_learned_inner_rates_match_finite_differences():
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    maml = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=2, learn_inner_lr=True)
    with torch.no_grad():  # distinct rates, so that a mix-up of names/shapes would show
        for r in maml.inner_rates.parameters():
            r.uniform_(0.05, 0.2)
    data = regression_tasks()
    analytic = flat_grad(maml, data)
    numeric = central_differences(maml, data, 2)
    n_model = sum(p.numel() for p in model.parameters())
    assert analytic.numel() == 2 * n_model  # one rate per parameter element
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert analytic[n_model:].abs().max() > 1e-4


def test_adapting_a_subset_leaves_the_rest_and_matches_reference():
    model = small_mlp()
    maml = MAML(model, F.mse_loss, inner_lr=0.05, inner_steps=2, adapt="4")
    sx, sy, _, _ = regression_tasks(tasks=1)
    adapted = maml.adapt(sx[0], sy[0])
    for name, p in model.named_parameters():
        same = torch.equal(adapted[name], p)
        assert same != name.startswith("4."), name


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_without_the_private_torch_state_it_reads(monkeypatch, first_order):
    """A torch without the private hooks that choose ``torch.autograd.grad`` for looped tasks
    falls back to ``torch.func.grad``: same meta-gradient, no AttributeError."""
    data = regression_tasks()
    maml = MAML(small_mlp(), F.mse_loss, inner_lr=0.05, inner_steps=2, batching="loop",
                first_order=first_order)
    expected = flat_grad(maml, data)
    monkeypatch.delattr(torch._C._functorch, "peek_interpreter_stack")
    torch.testing.assert_close(flat_grad(maml, data), expected, rtol=1e-10, atol=1e-12)
