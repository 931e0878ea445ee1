"""Inputs given as a tuple of tensors (``model(*x)``) or a dict (``model(**x)``) go through every
algorithm like one tensor does: the same adaptation, meta-gradient and evaluation curve."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import ANIL, IMAML, MAML, Pretrained, Reptile, TaskBatch
from metagrad.core.batching import per_task
from metagrad.errors import ConfigError

DT = torch.float64


class TwoInputs(nn.Module):
    """``forward(image, extra)``: two inputs of different sizes."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(3, 6)
        self.extra = nn.Linear(2, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, image, extra):
        return self.head(torch.tanh(self.image(image) + self.extra(extra)))


class ExactTwoInputs(TwoInputs):
    vmap_exact_forward = True  # add, tanh and the layers only


class Concatenated(nn.Module):
    """The same network on one tensor ``cat([image, extra], -1)``: the single-input reference."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[..., :3], x[..., 3:])


def model(cls=TwoInputs, seed=0):
    torch.manual_seed(seed)
    return cls().to(DT)


def data(tasks=3, shots=5, queries=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(tasks, shots, 5, generator=g, dtype=DT)
    q = torch.randn(tasks, queries, 5, generator=g, dtype=DT)
    w = torch.randn(tasks, 5, 1, generator=g, dtype=DT)
    return s, torch.sin(s @ w), q, torch.sin(q @ w)


def as_tuple(x):
    return x[..., :3], x[..., 3:]


def as_dict(x):
    return {"image": x[..., :3], "extra": x[..., 3:]}


def batch_of(form, tasks=3):
    s, sy, q, qy = data(tasks)
    return TaskBatch(form(s), sy, form(q), qy)


def grads(learner, batch):
    learner.zero_grad()
    loss = learner.meta_gradient(batch)
    return loss, {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def reference_meta_gradient(net, lr, steps, batch, call):
    """Plain autograd, one task at a time: K unrolled steps, then the query loss."""
    names, theta = zip(*net.named_parameters())
    total = 0
    for i in range(batch.num_tasks):
        sx = {k: v[i] for k, v in batch.support_x.items()} if isinstance(batch.support_x, dict) \
            else tuple(v[i] for v in batch.support_x)
        qx = {k: v[i] for k, v in batch.query_x.items()} if isinstance(batch.query_x, dict) \
            else tuple(v[i] for v in batch.query_x)
        fast = list(theta)
        for _ in range(steps):
            out = call(net, dict(zip(names, fast)), sx)
            g = torch.autograd.grad(F.mse_loss(out, batch.support_y[i]), fast, create_graph=True)
            fast = [w - lr * gi for w, gi in zip(fast, g)]
        total = total + F.mse_loss(call(net, dict(zip(names, fast)), qx), batch.query_y[i])
    return dict(zip(names, torch.autograd.grad(total / batch.num_tasks, theta)))


def functional(net, params, x):
    if isinstance(x, dict):
        return torch.func.functional_call(net, params, (), x)
    return torch.func.functional_call(net, params, x)


@pytest.mark.parametrize("form", [as_tuple, as_dict], ids=["tuple", "dict"])
@pytest.mark.parametrize("batching", ["auto", "loop", "vmap"])
def test_meta_gradient_equals_the_per_task_reference(form, batching):
    net = model(ExactTwoInputs if batching == "vmap" else TwoInputs)
    batch = batch_of(form)
    maml = MAML(net, F.mse_loss, 0.1, inner_steps=2, batching=batching)
    _, got = grads(maml, batch)
    ref = reference_meta_gradient(net, 0.1, 2, batch, functional)
    assert got.keys() == {f"model.{n}" for n in ref}
    for n, g in ref.items():
        torch.testing.assert_close(got[f"model.{n}"], g, rtol=1e-10, atol=1e-12)
    # and the meta-loss agrees with the one-tensor model
    single = MAML(Concatenated(net), F.mse_loss, 0.1, inner_steps=2)
    torch.testing.assert_close(maml.meta_loss(*batch.tensors()), single.meta_loss(*data()))


@pytest.mark.parametrize("form", [as_tuple, as_dict], ids=["tuple", "dict"])
def test_adapt_and_evaluation_curve_match_one_tensor_inputs(form):
    net = model()
    maml = MAML(net, F.mse_loss, 0.1, inner_steps=2)
    single = MAML(Concatenated(net), F.mse_loss, 0.1, inner_steps=2)
    s, sy, q, qy = data()
    adapted = maml.adapt(form(s[0]), sy[0], 3)
    reference = single.adapt(s[0], sy[0], 3)
    for n, p in adapted.items():
        torch.testing.assert_close(p, reference[f"inner.{n}"])
    mse = lambda out, y: (out - y).pow(2).mean()  # noqa: E731
    curve = maml.evaluation_curve(batch_of(form), 4, mse)
    assert curve.shape == (3, 5) and not curve.requires_grad
    torch.testing.assert_close(curve, single.evaluation_curve(TaskBatch(s, sy, q, qy), 4, mse))
    # by hand for task 0: plain gradient steps from θ, the metric on the queries after each
    names, fast = zip(*((n, p.detach().requires_grad_()) for n, p in net.named_parameters()))
    x, xq = form(s[0]), form(q[0])
    for k in range(5):
        params = dict(zip(names, fast))
        torch.testing.assert_close(curve[0, k], mse(functional(net, params, xq), qy[0]))
        g = torch.autograd.grad(F.mse_loss(functional(net, params, x), sy[0]), fast)
        fast = [(w - 0.1 * gi).detach().requires_grad_() for w, gi in zip(fast, g)]
    # the learner is untouched
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("cls", [ANIL, IMAML, Reptile, Pretrained])
@pytest.mark.parametrize("form", [as_tuple, as_dict], ids=["tuple", "dict"])
def test_every_gradient_learner_takes_several_inputs(cls, form):
    net = model()
    several = cls(copy.deepcopy(net), F.mse_loss, 0.1, inner_steps=2)
    single = cls(Concatenated(copy.deepcopy(net)), F.mse_loss, 0.1, inner_steps=2,
                 **({"head": "inner.head"} if cls is ANIL else {}))
    loss, got = grads(several, batch_of(form))
    ref_loss, ref = grads(single, TaskBatch(*data()))
    torch.testing.assert_close(loss, ref_loss)
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n.replace("model.", "model.inner.", 1)])
    assert any(g.abs().max() > 0 for g in got.values())


def test_task_batch_indexes_and_moves_several_inputs():
    batch = batch_of(as_dict, tasks=4)
    assert batch.num_tasks == len(batch) == 4
    part = batch[1:3]
    assert part.support_x["extra"].shape == (2, 5, 2)
    torch.testing.assert_close(part.support_x["image"], batch.support_x["image"][1:3])
    assert batch[0].query_x["image"].shape == (1, 4, 3)
    moved = batch_of(as_tuple).to(dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in moved.support_x)
    with pytest.raises(ValueError, match=r"query_x\['extra'\] has 2 tasks"):
        TaskBatch(batch.support_x, batch.support_y,
                  {"image": batch.query_x["image"], "extra": batch.query_x["extra"][:2]},
                  batch.query_y)


def test_per_task_stacks_nested_outputs_in_both_modes():
    x = torch.arange(12.0).reshape(3, 4)

    def task(row):
        return {"sum": row.sum()}, (row * 2, row.max())

    for batching in ("vmap", "loop"):
        out = per_task(task, (x,), batching, nn.Identity(), first_order=True)
        torch.testing.assert_close(out[0]["sum"], x.sum(1))
        torch.testing.assert_close(out[1][0], x * 2)
        torch.testing.assert_close(out[1][1], x.max(1).values)


def test_mismatched_or_malformed_inputs_are_explained():
    s, sy, q, qy = data()
    maml = MAML(model(), F.mse_loss, 0.1)
    with pytest.raises(ConfigError, match="differ in structure"):
        maml.meta_loss(as_tuple(s), sy, as_dict(q), qy)
    with pytest.raises(ConfigError, match=r"support_x\[1\] has 2, "):
        maml.meta_loss((s[..., :3], s[:2, :, 3:]), sy, as_tuple(q), qy)
    with pytest.raises(ConfigError, match=r"4 inputs but 5 targets.*support inputs\['extra'\] \(4, 2\)"):
        maml.adapt({"image": s[0, :, :3], "extra": s[0, :4, 3:]}, sy[0])
    with pytest.raises(ConfigError, match="must be a tensor, a tuple of tensors or a dict"):
        maml.meta_loss([s], sy, [q], qy)
    with pytest.raises(ConfigError, match=r"support_x\[0\] must be a tensor"):
        maml.meta_loss(("x", s), sy, ("x", q), qy)
