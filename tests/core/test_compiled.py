"""The opt-in compiled meta-gradient equals the eager one."""

import torch
import torch.nn.functional as F

from metagrad import MAML
from metagrad.models.mlp import MLP
from metagrad.tasks.sinusoid import SinusoidTasks


def test_compiled_meta_gradient_matches_eager():
    torch.manual_seed(0)
    batch = SinusoidTasks(5, 5).sample(4, torch.Generator().manual_seed(0))
    grads = []
    for compile in (False, True):
        torch.manual_seed(0)
        maml = MAML(MLP([1, 8, 1]), F.mse_loss, inner_lr=0.05, inner_steps=2,
                    learn_inner_lr=True, compile=compile)
        loss = maml.meta_gradient(batch)
        grads.append((loss, [p.grad.clone() for p in maml.parameters()]))
    (eager_loss, eager), (compiled_loss, compiled) = grads
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert len(eager) == len(compiled) == 8  # 4 weights + 4 learned rates
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
