"""MAML++'s per-step BatchNorm (BNWB, BNRS): slot k for the parameters θ'ₖ after k inner steps."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gradcheck import central_differences
from torch import nn

from metagrad import MAML
from metagrad.algorithms.mamlpp import MAMLpp
from metagrad.core.batching import use_vmap
from metagrad.core.per_step_norm import PerStepBatchNorm, per_step_batch_norm
from metagrad.core.taskbatch import TaskBatch
from metagrad.training.evaluation import evaluation_curves

DT = torch.float64
K = 2
BN_NAMES = ("1.weight", "1.bias")


def mlp_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def conv_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 1)).to(DT)


def tasks(n=2, shots=5, queries=6, shape=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(n, shots, *shape, generator=g, dtype=DT)
    qx = torch.randn(n, queries, *shape, generator=g, dtype=DT)
    def target(x):
        return torch.sin(x.flatten(2).sum(-1, keepdim=True))
    return TaskBatch(sx, target(sx), qx, target(qx))


def non_bn(model):
    return [n for n, _ in model.named_parameters() if n not in BN_NAMES]


def distinct_slots(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PerStepBatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=DT) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=DT))


def grads_of(learner, batch):
    learner.zero_grad()
    learner.meta_gradient(batch)
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def pp(model, **kw):
    kw = {"inner_lr": 0.1, "inner_steps": K, "iterations_per_epoch": 1, "msl_epochs": 10,
          "learn_step_lrs": True, **kw}
    return MAMLpp(model, F.mse_loss, **kw)


def with_row(ordinary, per_step, k):
    """The ordinary model whose BatchNorm holds row k of the per-step layer."""
    out = copy.deepcopy(ordinary)
    with torch.no_grad():
        out[1].weight.copy_(per_step.model[1].weight[k])
        out[1].bias.copy_(per_step.model[1].bias[k])
    return out


# -- construction ----------------------------------------------------------------------------
def test_conversion_copies_parameters_and_statistics_into_every_slot():
    model = conv_bn()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].running_mean.normal_()
    x = torch.randn(4, 1, 5, 5, dtype=DT)
    ref = copy.deepcopy(model)
    per_step_batch_norm(model, 3)
    layer = model[1]
    assert isinstance(layer, PerStepBatchNorm) and layer.weight.shape == (3, 2)
    assert torch.equal(layer.weight, ref[1].weight.expand(3, 2))
    assert torch.equal(layer.running_mean, ref[1].running_mean.expand(3, 2))
    for mode in (False, True):  # eval first: train mode updates the statistics
        model.train(mode), ref.train(mode)
        for step in (None, 0, 1, 7):
            layer.step = step
            torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(ValueError, match="4D"):
        layer(torch.randn(3, 2, dtype=DT))


def test_per_step_layers_are_never_vmapped_automatically():
    learner = pp(mlp_bn(), per_step_bn=True)
    assert not use_vmap("auto", learner.model, False)
    assert not use_vmap("auto", learner.model, True)


def test_mamlpp_does_not_adapt_the_per_step_affine_parameters_unless_asked():
    learner = pp(mlp_bn(), per_step_bn=True)
    assert set(learner.adapted_names) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    asked = pp(mlp_bn(), per_step_bn=True, adapt=None)  # None: the default
    assert set(asked.adapted_names) == set(learner.adapted_names)
    everything = pp(mlp_bn(), per_step_bn=True, adapt=lambda n, p: True)
    assert set(everything.adapted_names) == {n for n, _ in everything.model.named_parameters()}


# -- (a) identical slots: the ordinary model's meta-gradient ---------------------------------
@pytest.mark.parametrize("make, shape", [(mlp_bn, (2,)), (conv_bn, (1, 5, 5))])
@pytest.mark.parametrize("msl", [True, False])
def test_identical_slots_give_the_ordinary_meta_gradient(make, shape, msl):
    batch = tasks(shape=shape)
    ordinary = pp(make(), adapt=non_bn(make()), multi_step_loss=msl)
    per_step = pp(make(), per_step_bn=True, multi_step_loss=msl)
    assert per_step.adapted_names == ordinary.adapted_names
    g0, g1 = grads_of(ordinary, batch), grads_of(per_step, batch)
    for name, g in g0.items():
        if name.startswith("model.1."):
            assert g1[name].shape == (K + 1, g.numel())
            assert g1[name].abs().sum(1).min() > 0  # every slot is used
            torch.testing.assert_close(g1[name].sum(0), g)
        else:
            torch.testing.assert_close(g1[name], g)


# -- (b) the step index selects the slot -----------------------------------------------------
def manual_path(ordinary, learner, sx, sy, steps):
    """θ'₀..θ'_steps by plain autograd, step k with the ordinary model holding row k."""
    theta = {n: p.detach() for n, p in learner.params().items()}
    path = [theta]
    for k in range(steps):
        model = with_row(ordinary, learner, min(k, K))
        p = {n: t.clone().requires_grad_(n in learner.adapted_names) for n, t in path[-1].items()}
        with torch.no_grad():
            for n, t in model.named_parameters():
                if n not in BN_NAMES:
                    t.copy_(p[n])
        loss = F.mse_loss(model(sx), sy)
        names = [n for n in learner.adapted_names]
        gs = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
        lr = learner.learning_rate()
        path.append({**path[-1], **{n: path[-1][n] - lr(k, n).detach() * g
                                    for n, g in zip(names, gs, strict=True)}})
    return path


def forward_with_row(ordinary, learner, params, x, k):
    model = with_row(ordinary, learner, k)
    with torch.no_grad():
        for n, t in model.named_parameters():
            if n not in BN_NAMES:
                t.copy_(params[n])
        return model(x)


def test_step_k_uses_slot_k_in_adaptation_query_loss_and_evaluation():
    ordinary = mlp_bn()
    learner = pp(mlp_bn(), per_step_bn=True)
    distinct_slots(learner.model)
    batch = tasks(n=3)
    sx, sy, qx, qy = (t[0] for t in batch.tensors())
    steps = 4  # beyond K: the last slot
    path = learner.adapt(sx, sy, steps, trajectory=True, first_order=True)
    ref = manual_path(ordinary, learner, sx, sy, steps)
    for k in range(steps + 1):
        for n in learner.adapted_names:
            torch.testing.assert_close(path[k][n], ref[k][n])
        out = learner.functional_forward(path[k], qx, step=k)
        torch.testing.assert_close(out, forward_with_row(ordinary, learner, ref[k], qx,
                                                         min(k, K)))
    # a wrong slot gives a different output (the test can fail)
    assert not torch.allclose(learner.functional_forward(path[1], qx, step=0),
                              learner.functional_forward(path[1], qx, step=1))
    # the multi-step loss: Σ w_k L(θ'_k; slot k)
    weights = learner.step_weights(K)
    assert weights is not None
    with torch.no_grad():
        msl = learner.task_query_loss(sx, sy, qx, qy)
        expected = sum(w * F.mse_loss(forward_with_row(ordinary, learner, ref[k], qx, k), qy)
                       for k, w in enumerate(weights, 1))
        torch.testing.assert_close(msl, expected)
        learner.multi_step_loss = False
        plain = learner.task_query_loss(sx, sy, qx, qy)
        torch.testing.assert_close(
            plain, F.mse_loss(forward_with_row(ordinary, learner, ref[K], qx, K), qy))

    class Sampler:
        def sample(self, n, generator):
            return TaskBatch(*(t[:n] for t in batch.tensors()))

    curves = evaluation_curves(learner, Sampler(), 3, steps, "mse", torch.Generator())
    for t in range(3):
        sx, sy, qx, qy = (x[t] for x in batch.tensors())
        ref = manual_path(ordinary, learner, sx, sy, steps)
        expected = torch.stack([
            F.mse_loss(forward_with_row(ordinary, learner, ref[k], qx, min(k, K)), qy)
            for k in range(steps + 1)])
        torch.testing.assert_close(curves[t], expected)


# -- (c) the meta-gradient of every slot ------------------------------------------------------
def unrolled_meta_loss(theta, gamma, beta, batch, lr, weights):
    """MAML++ written out with plain autograd: Linear → BN(slot k) → tanh → Linear."""
    def f(p, x, k):
        h = F.linear(x, p["0.weight"], p["0.bias"])
        h = F.batch_norm(h, None, None, gamma[k], beta[k], training=True)
        return F.linear(torch.tanh(h), p["3.weight"], p["3.bias"])

    total = 0
    for sx, sy, qx, qy in zip(*batch.tensors(), strict=True):
        p = dict(theta)
        task = 0
        for k in range(K):
            g = torch.autograd.grad(F.mse_loss(f(p, sx, k), sy), list(p.values()),
                                    create_graph=True)
            p = {n: t - lr * gi for (n, t), gi in zip(p.items(), g, strict=True)}
            task = task + weights[k] * F.mse_loss(f(p, qx, k + 1), qy)
        total = total + task
    return total / batch.num_tasks


@pytest.mark.parametrize("msl", [True, False])
def test_every_slot_gets_the_unrolled_and_finite_difference_meta_gradient(msl):
    learner = pp(mlp_bn(), per_step_bn=True, learn_step_lrs=False, multi_step_loss=msl,
                 iterations_per_epoch=1000)  # the MSL weights stay those of epoch 0
    distinct_slots(learner.model)
    batch = tasks()
    weights = learner.step_weights(K) or [0.0] * (K - 1) + [1.0]
    grads = grads_of(learner, batch)
    layer = learner.model[1]
    theta = {n: p for n, p in learner.params().items() if n not in BN_NAMES}
    loss = unrolled_meta_loss(theta, layer.weight, layer.bias, batch, 0.1, weights)
    ref = torch.autograd.grad(loss, [layer.weight, layer.bias, *theta.values()])
    names = ["1.weight", "1.bias", *theta]
    for name, r in zip(names, ref, strict=True):
        torch.testing.assert_close(grads["model." + name], r)
    g = grads["model.1.weight"]
    assert (g.abs().sum(1) > 1e-6).all()  # slots 0..K-1 (support, second order) and K (query)
    numeric = central_differences(lambda: learner.meta_loss(*batch.tensors()),
                                  [layer.weight, layer.bias])
    torch.testing.assert_close(torch.cat([g.reshape(-1), grads["model.1.bias"].reshape(-1)]),
                               numeric, rtol=1e-6, atol=1e-8)


def test_plain_maml_with_per_step_layers_adapting_them_too():
    """Generic: any model holding PerStepBatchNorm works with MAML (here γ, β adapt too)."""
    model = per_step_batch_norm(mlp_bn(), K + 1)
    distinct_slots(model)
    learner = MAML(model, F.mse_loss, inner_lr=0.1, inner_steps=K)
    assert "1.weight" in learner.adapted_names
    batch = tasks()
    grads = grads_of(learner, batch)
    layer = learner.model[1]
    numeric = central_differences(lambda: learner.meta_loss(*batch.tensors()), [layer.weight])
    torch.testing.assert_close(grads["model.1.weight"].reshape(-1), numeric, rtol=1e-6,
                               atol=1e-8)


# -- (d) running statistics per slot (BNRS) --------------------------------------------------
def test_non_transductive_training_keeps_running_statistics_per_slot():
    learner = pp(mlp_bn(), per_step_bn=True, transductive=False, multi_step_loss=False)
    distinct_slots(learner.model)
    batch = tasks(n=1)
    sx, sy, qx, _ = (t[0] for t in batch.tensors())
    path = learner.adapt(sx, sy, trajectory=True, first_order=True)
    learner.meta_gradient(batch)
    layer = learner.model[1]
    momentum = layer.momentum
    for k in range(K + 1):  # every slot evaluation reads, although the loss uses only slot K
        h = F.linear(qx, path[k]["0.weight"], path[k]["0.bias"])
        torch.testing.assert_close(layer.running_mean[k], momentum * h.mean(0))
        torch.testing.assert_close(layer.running_var[k],
                                   (1 - momentum) + momentum * h.var(0, unbiased=True))
    assert layer.num_batches_tracked.tolist() == [1] * (K + 1)
    assert not torch.allclose(layer.running_mean[0], layer.running_mean[K])
    # evaluation (eval mode): query after k steps normalised with slot k's statistics
    learner.eval()
    for k in range(K + 1):
        out = learner.functional_forward(path[k], qx, step=k)
        h = F.linear(qx, path[k]["0.weight"], path[k]["0.bias"])
        h = F.batch_norm(h, layer.running_mean[k], layer.running_var[k], layer.weight[k],
                         layer.bias[k], training=False)
        torch.testing.assert_close(out, F.linear(torch.tanh(h), path[k]["3.weight"],
                                                 path[k]["3.bias"]))


def test_transductive_training_leaves_running_statistics_alone():
    learner = pp(mlp_bn(), per_step_bn=True)
    before = copy.deepcopy(learner.model[1].state_dict())
    learner.meta_gradient(tasks())
    for name, t in learner.model[1].state_dict().items():
        assert torch.equal(t, before[name]), name


# -- (e) checkpointed inner steps ---------------------------------------------------------------
@pytest.mark.parametrize("adapt_bn", [False, True])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(adapt_bn):
    extra = {"adapt": lambda n, p: True} if adapt_bn else {}
    a = pp(mlp_bn(), per_step_bn=True, **extra)
    b = pp(mlp_bn(), per_step_bn=True, checkpoint_inner_steps=True, **extra)
    distinct_slots(a.model), distinct_slots(b.model)
    batch = tasks()
    ga, gb = grads_of(a, batch), grads_of(b, batch)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name])


# -- (f) configuration, command line, checkpoints -------------------------------------------
def test_state_dict_round_trip():
    a = pp(conv_bn(), per_step_bn=True)
    distinct_slots(a.model)
    a.meta_gradient(tasks(shape=(1, 5, 5)))
    b = pp(conv_bn(seed=5), per_step_bn=True)
    b.load_state_dict(a.state_dict())
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
    with pytest.raises(RuntimeError, match="size mismatch"):
        pp(conv_bn()).load_state_dict(a.state_dict())


def test_config_builds_mamlpp_with_per_step_batch_norm(monkeypatch):
    from metagrad.cli import build_parser
    from metagrad.config import resolve
    from metagrad.training import experiment

    args = build_parser().parse_args(["train", "omniglot", "--algo", "mamlpp",
                                      "--mamlpp-per-step-bn", "true"])
    assert args.set_mamlpp_per_step_bn == "true"
    cfg = resolve("omniglot", None, {"algo": "mamlpp", "mamlpp_per_step_bn": "true",
                                     "inner_steps": 3})
    assert cfg.mamlpp_per_step_bn is True
    learner = experiment.make_learner(cfg, MAMLpp, experiment.omniglot_conv(5), "accuracy")
    layers = [m for m in learner.model.modules() if isinstance(m, PerStepBatchNorm)]
    assert layers and all(m.slots == 4 for m in layers)
    assert not any(type(m) is nn.BatchNorm2d for m in learner.model.modules())
    off = experiment.make_learner(resolve("omniglot", None, {"algo": "mamlpp"}), MAMLpp,
                                  experiment.omniglot_conv(5), "accuracy")
    assert not any(isinstance(m, PerStepBatchNorm) for m in off.model.modules())


def test_forced_vmap_gives_the_looped_meta_gradient():
    """Under vmap BatchNorm runs as plain tensor ops (fast_norm), with the slot's γ and β."""
    loop = pp(mlp_bn(), per_step_bn=True, batching="loop")
    vmapped = pp(mlp_bn(), per_step_bn=True, batching="vmap")
    distinct_slots(loop.model), distinct_slots(vmapped.model)
    batch = tasks(n=3)
    ga, gb = grads_of(loop, batch), grads_of(vmapped, batch)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name])


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
DATA = os.environ.get("METAGRAD_DATA") or (str(SHARED) if SHARED.is_dir() else None)


@pytest.mark.skipif(DATA is None or not any(
    (Path(DATA) / sub / "images_background.zip").is_file() for sub in ("", "omniglot")),
    reason="Omniglot not found (set METAGRAD_DATA)")
def test_command_line_run_with_per_step_batch_norm_resumes(tmp_path):
    """``metagrad train omniglot --algo mamlpp --mamlpp-per-step-bn true``, then --resume
    (about 10 s)."""
    from metagrad.cli import main
    from metagrad.training.checkpoint import CheckpointDir

    run = tmp_path / "run"
    common = ["--no-progress", "--no-eval", "--out", str(run)]
    assert main(["train", "omniglot", "--data", DATA, "--algo", "mamlpp",
                 "--mamlpp-per-step-bn", "true", "--transductive", "false", "--iterations", "2",
                 "--meta-batch", "2", "--inner-steps", "2", "--val-every", "100",
                 "--checkpoint-every", "1", "--threads", "1", *common]) == 0
    assert main(["train", "omniglot", "--resume", "--iterations", "3", *common]) == 0
    state = CheckpointDir(run / "checkpoints").latest_state()
    model = state["learners"]["mamlpp"]
    assert model["model.features.bn0.weight"].shape == (3, 64)
    assert model["model.features.bn0.num_batches_tracked"].tolist() == [3 * 2] * 3
