"""Property-based: over random shapes and settings, the core API either gives the meta-loss and
meta-gradient of an independent unrolled reference, or, for an input with one known defect,
raises the ConfigError that names that defect — never an unexplained exception.

Half of the draws are valid (and checked against the reference), half carry exactly one defect;
the test asserts that both branches ran many times, so it cannot pass vacuously."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from metagrad import MAML
from metagrad.errors import ConfigError

DT = torch.float64
MAX_EXAMPLES = 80

# defect -> the fragment of the ConfigError message that must name it
DEFECTS = {
    "meta_loss steps < 0": "steps must be an integer >= 0",
    "inner_steps 0": "inner_steps must be a positive integer",
    "inner_lr 0": "inner_lr must be a finite number > 0",
    "inner_lr < 0": "inner_lr must be a finite number > 0",
    "adapt selects nothing": "no parameters selected for adaptation",
    "unknown batching": "batching must be 'auto', 'vmap' or 'loop'",
    "tasks differ": "mismatched task dimensions",
    "no tasks": "the task batch is empty",
    "no support examples": "support_x has no examples",
    "no query examples": "query_x has no examples",
    "support targets miscounted": "support set: ",
    "no task dimension": "expected a leading task dimension",
    "support and query inputs differ": "support and query examples differ in shape",
    "input size the model cannot take": "the model could not process the inputs",
}

OUTCOMES: Counter = Counter()


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)


def reference(net, adapt, lr, steps, first_order, data):
    """Plain autograd: per task, ``steps`` updates θ − α∇L of the adapted parameters (their
    gradients detached when first-order), then the query loss; the mean over tasks."""
    names, theta = zip(*net.named_parameters(), strict=True)
    adapted = [n for n in names if adapt is None or any(
        n == a or n.startswith(a + ".") for a in ([adapt] if isinstance(adapt, str) else adapt))]
    losses = []
    for sx, sy, qx, qy in zip(*data, strict=True):
        fast = dict(zip(names, theta, strict=True))
        for _ in range(steps):
            loss = F.mse_loss(torch.func.functional_call(net, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted],
                                        create_graph=not first_order)
            fast.update({n: fast[n] - lr * g for n, g in zip(adapted, grads, strict=True)})
        losses.append(F.mse_loss(torch.func.functional_call(net, fast, (qx,)), qy))
    total = torch.stack(losses).mean()
    return total.detach(), torch.autograd.grad(total, theta)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(defect=st.one_of(st.none(), st.sampled_from(sorted(DEFECTS))),
       tasks=st.integers(1, 3), support=st.integers(1, 4), query=st.integers(1, 4),
       inner_steps=st.integers(1, 3), steps=st.one_of(st.none(), st.integers(0, 3)),
       first_order=st.booleans(), adapt=st.sampled_from([None, "0", "2", ["2.bias"]]),
       lr=st.floats(0.01, 0.5), batching=st.sampled_from(["auto", "vmap", "loop"]),
       seed=st.integers(0, 2**16))
def check_meta_loss(defect, tasks, support, query, inner_steps, steps, first_order, adapt, lr,
                    batching, seed):
    kw = {"inner_lr": lr, "inner_steps": inner_steps, "first_order": first_order,
          "adapt": adapt, "batching": batching}
    counts = {"sx": tasks, "sy": tasks, "qx": tasks, "qy": tasks}
    examples = {"sx": support, "sy": support, "qx": query, "qy": query}
    features = {"sx": 2, "sy": 1, "qx": 2, "qy": 1}
    match defect:
        case "meta_loss steps < 0":
            steps = -1
        case "inner_steps 0":
            kw["inner_steps"] = 0
        case "inner_lr 0":
            kw["inner_lr"] = 0.0
        case "inner_lr < 0":
            kw["inner_lr"] = -lr
        case "adapt selects nothing":
            kw["adapt"] = "1"  # the Tanh: no parameters
        case "unknown batching":
            kw["batching"] = "vmapped"
        case "tasks differ":
            counts["qy"] = tasks + 1
        case "no tasks":
            counts = dict.fromkeys(counts, 0)
        case "no support examples":
            examples["sx"] = examples["sy"] = 0
        case "no query examples":
            examples["qx"] = examples["qy"] = 0
        case "support targets miscounted":
            examples["sy"] = support + 1
        case "support and query inputs differ":
            features["qx"] = 3
        case "input size the model cannot take":
            features["sx"] = features["qx"] = 3
    g = torch.Generator().manual_seed(seed)
    data = {k: torch.randn(counts[k], examples[k], features[k], generator=g, dtype=DT)
            for k in counts}
    if defect == "no task dimension":
        data["sx"] = data["sx"][0, 0]  # one example's features alone
    net = model()
    if defect is not None:
        with pytest.raises(ConfigError, match=DEFECTS[defect]) as info:
            maml = MAML(net, F.mse_loss, **kw)
            maml.meta_loss(data["sx"], data["sy"], data["qx"], data["qy"], steps=steps)
        assert "\n" not in str(info.value).strip()
        OUTCOMES[defect] += 1
        return
    maml = MAML(net, F.mse_loss, **kw)
    loss = maml.meta_loss(data["sx"], data["sy"], data["qx"], data["qy"], steps=steps)
    loss.backward()
    ref_loss, ref_grads = reference(net, adapt, lr, inner_steps if steps is None else steps,
                                    first_order, tuple(data.values()))
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)
    for p, ref in zip(net.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-10)
    OUTCOMES["valid"] += 1


def test_meta_loss_matches_the_reference_or_names_the_defect():
    OUTCOMES.clear()
    check_meta_loss()
    assert OUTCOMES["valid"] >= MAX_EXAMPLES // 4, OUTCOMES
    assert len(set(OUTCOMES) - {"valid"}) >= len(DEFECTS) // 2, OUTCOMES


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_every_defect_is_named(defect):
    """Each defect at least once, whatever the draws above covered."""
    check_meta_loss.hypothesis.inner_test(
        defect=defect, tasks=2, support=3, query=2, inner_steps=2, steps=None, first_order=False,
        adapt=None, lr=0.1, batching="auto", seed=0)
