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
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks

STEPS = 5
ITERATIONS = 40


def effective_rates(learner: MAMLpp) -> torch.Tensor:
    """``[adapted tensors, steps]``: the rate each inner step applies to each tensor."""
    with torch.no_grad():
        return torch.stack([torch.stack([learner.inner_rates(k, n) for k in range(STEPS)])
                            for n in learner.adapted_names])


@pytest.mark.xfail(strict=True, reason=(
    "algorithms/mamlpp.py + core/rates.py: LSLR rates are unconstrained parameters stepped by "
    "Adam at 1e-3 from 0.01, i.e. ~10% of their value per iteration; the rates of fc1.weight, "
    "fc1.bias and head.bias cross zero within 20 iterations (and training diverges at iteration "
    "188); see the report / README"))
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
