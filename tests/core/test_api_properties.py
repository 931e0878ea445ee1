"""Property-based: over random shapes and settings, the core API either works or raises a
MetagradError that names the problem — never an unexplained exception."""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from metagrad import MAML, MetagradError

dims = st.integers(min_value=0, max_value=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=st.tuples(dims, dims, dims, dims), support=st.integers(0, 4),
       query=st.integers(0, 4), x_dims=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       y_dims=st.tuples(st.integers(1, 2), st.integers(1, 2)), steps=st.integers(-2, 3),
       first_order=st.booleans(), adapt=st.sampled_from([None, "0", "1", "nothing", ["1.bias"]]),
       lr=st.sampled_from([0.1, 0.0, -1.0]))
def test_meta_loss_works_or_explains(tasks, support, query, x_dims, y_dims, steps, first_order,
                                     adapt, lr):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    try:
        maml = MAML(model, F.mse_loss, inner_lr=lr, inner_steps=max(steps, 1),
                    first_order=first_order, adapt=adapt)
        sx = torch.randn(tasks[0], support, x_dims[0])
        qx = torch.randn(tasks[2], query, x_dims[1])
        sy = torch.randn(tasks[1], support, y_dims[0])
        qy = torch.randn(tasks[3], query, y_dims[1])
        loss = maml.meta_loss(sx, sy, qx, qy, steps=steps)
        loss.backward()
    except MetagradError as exc:
        assert str(exc)
        return
    # it worked: then the inputs were consistent
    assert lr > 0 and steps >= 0 and len(set(tasks)) == 1 and support > 0 and query > 0
    assert x_dims == (2, 2) and torch.isfinite(loss)
