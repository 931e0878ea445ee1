"""``checkpoint_inner_steps``: the inner steps' activations are recomputed during the meta-backward
instead of stored. The meta-gradient must be exactly the stored second-order one, and the option
must really run the recomputing path and hold less memory."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import ANIL, CAVIA, MAML, MAMLpp, MetaSGD, TaskBatch
from metagrad.cli import build_parser
from metagrad.config import resolve
from metagrad.core.inner_loop import inner_loop
from metagrad.errors import ConfigError

DT = torch.float64


def conv_bn(ways=3) -> nn.Module:
    """Conv + BatchNorm (batch statistics) + pooling + linear head (``"4"``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, ways)).to(DT)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def classification_tasks(tasks=3, ways=3, shots=2, queries=3, flat=False) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    shape = (7,) if flat else (1, 8, 8)
    sx = torch.randn(tasks, ways * shots, *shape, generator=g, dtype=DT)
    qx = torch.randn(tasks, ways * queries, *shape, generator=g, dtype=DT)
    sy = torch.arange(ways).repeat(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat(queries).repeat(tasks, 1)
    return TaskBatch(sx, sy, qx, qy)


def meta_gradient(learner, batch) -> torch.Tensor:
    learner.zero_grad()
    loss = learner.meta_gradient(batch)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in learner.parameters()]
    return torch.cat([loss.reshape(1)] + [g.reshape(-1) for g in grads])


def cavia_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7 + 2, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


CASES = {
    "maml": (MAML, conv_bn, {}),
    "maml-head-only": (MAML, conv_bn, {"adapt": "5"}),  # the body learns through the head's steps
    "metasgd": (MetaSGD, conv_bn, {}),  # learned per-element α gets its gradient
    "mamlpp": (MAMLpp, conv_bn, {}),  # per-step rates and the multi-step loss (trajectory)
    "cavia": (CAVIA, cavia_mlp, {"context_dim": 2}),  # adapted context: requires_grad=False
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_meta_gradient_equals_stored(case, steps):
    cls, make_model, kwargs = CASES[case]
    batch = classification_tasks(flat=cls is CAVIA)
    grads = [meta_gradient(cls(make_model(), F.cross_entropy, inner_lr=0.3, inner_steps=steps,
                               checkpoint_inner_steps=checkpoint, **kwargs).to(DT), batch)
             for checkpoint in (False, True)]
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-13)


def test_checkpointed_meta_gradient_is_second_order():
    """Not the first-order approximation: the Hessian terms come back through the recomputation."""
    batch = classification_tasks()
    exact = meta_gradient(MAML(conv_bn(), F.cross_entropy, inner_lr=0.3, inner_steps=2,
                               checkpoint_inner_steps=True), batch)
    fo = meta_gradient(MAML(conv_bn(), F.cross_entropy, inner_lr=0.3, inner_steps=2,
                            first_order=True), batch)
    assert (exact - fo).abs().max() > 1e-4


def test_checkpointing_recomputes_each_inner_step():
    """The option is used: each inner step's support loss is evaluated twice (forward and
    recomputation in the meta-backward), against once when the graph is stored."""
    batch, steps = classification_tasks(tasks=2), 3
    for checkpoint, support_calls in ((False, steps), (True, 2 * steps)):
        calls = {"n": 0}

        def counting_loss(out, y, calls=calls):
            calls["n"] += 1
            return F.cross_entropy(out, y)
        learner = MAML(conv_bn(), counting_loss, inner_lr=0.3, inner_steps=steps,
                       checkpoint_inner_steps=checkpoint, batching="loop")  # 1 call per task
        learner.meta_gradient(batch)
        assert calls["n"] == 2 * (support_calls + 1)  # 2 tasks, + 1 query loss each


def _peak_tensor_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_checkpointing_lowers_peak_memory():
    """Stored, each inner step adds its support activations and inner-backward graph to the peak;
    checkpointed, the peak hardly depends on the number of steps (one step's graph at a time)."""
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(1, 64, 1, 16, 16, generator=g), torch.arange(4).repeat(16)[None],
                      torch.randn(1, 4, 1, 16, 16, generator=g), torch.arange(4)[None])
    peaks = {}
    for checkpoint in (False, True):
        for steps in (2, 6):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(16 * 16 * 16, 4))
            learner = MAML(model, F.cross_entropy, inner_lr=0.1, inner_steps=steps,
                           checkpoint_inner_steps=checkpoint)
            peaks[checkpoint, steps] = _peak_tensor_bytes(
                lambda m=learner: m.meta_gradient(batch))
    stored_growth = peaks[False, 6] - peaks[False, 2]
    assert stored_growth > 0.5 * peaks[False, 2]
    assert peaks[True, 6] - peaks[True, 2] < 0.1 * stored_growth
    assert peaks[True, 6] < 0.5 * peaks[False, 6]


def test_no_effect_without_gradients_or_in_first_order():
    learner = MAML(conv_bn(), F.cross_entropy, inner_lr=0.3, inner_steps=2,
                   checkpoint_inner_steps=True)
    batch = classification_tasks(tasks=1)
    plain = MAML(conv_bn(), F.cross_entropy, inner_lr=0.3, inner_steps=2)
    with torch.no_grad():
        a = learner.adapt(batch.support_x[0], batch.support_y[0])
        b = plain.adapt(batch.support_x[0], batch.support_y[0])
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    learner.first_order = plain.first_order = True
    torch.testing.assert_close(meta_gradient(learner, batch), meta_gradient(plain, batch))


def test_differentiating_the_meta_gradient_again_is_refused():
    learner = MAML(mlp(), F.cross_entropy, inner_lr=0.3, checkpoint_inner_steps=True)
    batch = classification_tasks(tasks=1, flat=True)
    loss = learner.meta_loss(*batch.tensors())
    grads = torch.autograd.grad(loss, list(learner.parameters()), create_graph=True)
    with pytest.raises(RuntimeError):
        sum(g.sum() for g in grads).backward()


def test_a_closure_tensor_needing_gradients_is_refused():
    """Its gradient through a recomputed step would be lost: an error, not a wrong result."""
    w = torch.randn(3, dtype=DT, requires_grad=True)
    params = {"a": torch.randn(3, dtype=DT, requires_grad=True)}
    out = inner_loop(lambda p: ((p["a"] * w) ** 2).sum(), params, steps=2, lr=0.1,
                     checkpoint=True)
    with pytest.raises(RuntimeError, match="not a parameter of the step"):
        out["a"].sum().backward()


def test_incompatible_settings_are_refused():
    with pytest.raises(ConfigError, match="checkpoint_inner_steps"):
        MAML(mlp(), F.cross_entropy, batching="vmap", checkpoint_inner_steps=True)
    with pytest.raises(ConfigError, match="checkpoint_inner_steps"):
        MAML(mlp(), F.cross_entropy, compile=True, checkpoint_inner_steps=True)
    with pytest.raises(ConfigError, match="head"):
        ANIL(nn.Sequential(nn.Linear(7, 8)), F.cross_entropy, head="0",
             checkpoint_inner_steps=True)
    for algo in ("anil", "reptile", "imaml"):
        with pytest.raises(ConfigError, match="checkpoint_inner_steps"):
            resolve("sinusoid", overrides={"algo": algo, "checkpoint_inner_steps": True})


def test_config_and_command_line_switch_it_on():
    argv = ["train", "omniglot", "--checkpoint-inner-steps", "--ways", "20"]
    args = build_parser(argv).parse_args(argv)
    assert args.set_checkpoint_inner_steps == "true" and args.set_ways == "20"
    cfg = resolve("omniglot", overrides={"ways": 20, "checkpoint_inner_steps": "true"})
    assert cfg.checkpoint_inner_steps and cfg.inner_steps == 5
    learner = MAML.from_config(conv_bn(20).float(), F.cross_entropy,
                               cfg.learner_settings(20, "cpu"))
    assert learner.checkpoint_inner_steps
    plain = resolve("omniglot")
    assert not MAML.from_config(conv_bn().float(), F.cross_entropy,
                                plain.learner_settings(5, "cpu")).checkpoint_inner_steps
