"""FunctionalModel puts the given tensors in the module's place for one call, exactly as
torch.func.functional_call does, and always restores the module's own."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from metagrad import MAML
from metagrad.core.functional import FunctionalModel


def own_tensors(model: nn.Module) -> dict[str, int]:
    return {n: id(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


def doubled(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: 2 * p.detach() for n, p in model.named_parameters()}


def test_output_equals_functional_call_and_the_module_keeps_its_tensors():
    model = net()
    functional = FunctionalModel(model)
    before = own_tensors(model)
    x = torch.randn(5, 3)
    params, buffers = doubled(model), functional.buffers()
    got = functional(params, buffers, x)
    expected = torch.func.functional_call(model, {**functional.buffers(), **params}, (x,))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, model(x))  # the given parameters were used
    assert own_tensors(model) == before
    assert buffers["1.num_batches_tracked"].item() == 1  # train-mode BatchNorm wrote the copies


def test_the_module_gets_its_tensors_back_when_the_forward_raises():
    model = net()
    functional = FunctionalModel(model)
    before = own_tensors(model)
    with pytest.raises(RuntimeError):
        functional(doubled(model), functional.buffers(), torch.randn(5, 7))  # wrong width
    assert own_tensors(model) == before


def test_a_submodule_replaced_after_wrapping_is_the_one_that_runs():
    model = net()
    functional = FunctionalModel(model)
    functional(doubled(model), functional.buffers(), torch.randn(5, 3))
    model[3] = nn.Linear(4, 2)
    params = doubled(model)
    x = torch.randn(5, 3)
    expected = torch.func.functional_call(model, {**functional.buffers(), **params}, (x,))
    torch.testing.assert_close(functional(params, functional.buffers(), x), expected, rtol=0, atol=0)


def test_parametrized_weights_adapt_through_their_original_tensor():
    """torch.nn.utils.parametrize stores ``weight`` as ``parametrizations.weight.original``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    parametrize.register_parametrization(model[0], "weight", _Scaled())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 6, d, generator=g, dtype=torch.float64) for d in (3, 1, 3, 1)]
    maml = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=2, batching="loop")
    maml.meta_loss(*data).backward()
    names, theta = zip(*model.named_parameters())
    assert "0.parametrizations.weight.original" in names
    total = 0
    for sx, sy, qx, qy in zip(*data):
        fast = list(theta)
        for _ in range(2):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (sx,))
            grads = torch.autograd.grad(F.mse_loss(out, sy), fast, create_graph=True)
            fast = [w - 0.1 * gr for w, gr in zip(fast, grads)]
        total = total + F.mse_loss(torch.func.functional_call(model, dict(zip(names, fast)), (qx,)), qy)
    reference = torch.autograd.grad(total / 2, theta)
    for p, r in zip(theta, reference):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)


class _Scaled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 0.5 * weight + weight.square()
