"""MAML++'s learned per-layer per-step inner rates (LSLR) stay positive and finite over a short
sinusoid meta-training at the paper's settings: 5 inner steps, rates initialised to the inner
rate, multi-step loss, Adam with meta-lr 1e-3 and cosine annealing (Antoniou et al. 2019, §4-5;
the sinusoid task's own settings from MAML §5.1: α 0.01, K = 10, meta-batch 25).

The rates are read through ``learner.inner_rates(step, name)``, the value the inner loop uses, so
the test holds for any parameterisation of them."""

import math

import pytest
import torch
import torch.nn.functional as F

from metagrad.algorithms.mamlpp import MAMLpp
from metagrad.algorithms.metasgd import MetaSGD
from metagrad.errors import CheckpointError
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks

STEPS = 5
ITERATIONS = 40


def effective_rates(learner: MAMLpp) -> torch.Tensor:
    """``[adapted tensors, steps]``: the rate each inner step applies to each tensor."""
    with torch.no_grad():
        return torch.stack([torch.stack([learner.inner_rates(k, n) for k in range(STEPS)])
                            for n in learner.adapted_names])


def test_learned_step_rates_stay_positive_and_finite():
    torch.manual_seed(0)
    learner = MAMLpp(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=STEPS,
                     msl_epochs=10, iterations_per_epoch=500)
    assert learner.inner_rates is not None
    initial = effective_rates(learner)
    assert torch.equal(initial, torch.full_like(initial, 0.01))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1000, 1e-5)
    tasks = SinusoidTasks(shots=10, queries=10)
    generator = torch.Generator().manual_seed(0)
    for iteration in range(1, ITERATIONS + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = learner.meta_gradient(tasks.sample(25, generator))
        assert math.isfinite(loss.item()), f"loss {loss.item()} at iteration {iteration}"
        optimizer.step()
        schedule.step()
        rates = effective_rates(learner)
        assert torch.isfinite(rates).all() and (rates > 0).all(), (
            f"iteration {iteration}: rates {rates}")
    assert not torch.equal(rates, initial)  # they are learned


def linear_rate_state(learner: MAMLpp, rates: torch.Tensor) -> dict[str, torch.Tensor]:
    """``learner``'s state dict as a version storing linear LSLR rates wrote it, with ``rates``
    (``[adapted tensors, steps]``) as the rates."""
    state = learner.state_dict()
    log_keys = [k for k in state if k.startswith("inner_rates.log_rates.")]
    assert len(log_keys) == len(learner.adapted_names)
    for key, row in zip(log_keys, rates, strict=True):
        del state[key]
        state[key.replace(".log_rates.", ".rates.")] = row.clone()
    return state


def test_a_checkpoint_of_linear_rates_loads_as_the_same_rates():
    learner = MAMLpp(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=STEPS)
    old = 0.01 * torch.rand(len(learner.adapted_names), STEPS) + 1e-3
    learner.load_state_dict(linear_rate_state(learner, old))
    torch.testing.assert_close(effective_rates(learner), old)
    assert all(".log_rates." in k for k in learner.state_dict() if k.startswith("inner_rates"))
    again = MAMLpp(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=STEPS)
    again.load_state_dict(learner.state_dict())  # and the new keys load as they are
    torch.testing.assert_close(effective_rates(again), old)


def test_a_checkpoint_of_non_positive_linear_rates_is_refused():
    learner = MAMLpp(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=STEPS)
    old = torch.full((len(learner.adapted_names), STEPS), 0.01)
    old[1, 3] = -2e-3
    with pytest.raises(CheckpointError, match=r"inner_rates\.rates\..*<= 0"):
        learner.load_state_dict(linear_rate_state(learner, old))


def test_metasgd_keeps_signed_linear_rates():
    learner = MetaSGD(sinusoid_mlp(), F.mse_loss, inner_lr=0.01)
    rates = dict(learner.inner_rates.named_parameters())
    assert rates and all(k.startswith("rates.") for k in rates)
    with torch.no_grad():
        next(iter(rates.values())).fill_(-0.5)
    name = learner.adapted_names[0]
    assert (learner.inner_rates(0, name) == -0.5).all()
