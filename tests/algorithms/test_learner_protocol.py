"""Every registered algorithm declares its Options and capabilities, is built by from_config and
evaluated by evaluation_curve (the protocol of metagrad.algorithms.base)."""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad.algorithms import ALGORITHMS
from metagrad.algorithms.base import Capabilities, Learner, LearnerSettings, NoOptions
from metagrad.algorithms.blackbox import BlackBox, BlackBoxOptions
from metagrad.algorithms.cavia import CAVIAOptions
from metagrad.algorithms.imaml import IMAMLOptions
from metagrad.algorithms.mamlpp import MAMLppOptions
from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4
from metagrad.models.mlp import MLP, sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training.evaluation import curve_steps, evaluation_curves, query_metric

NAMES = list(ALGORITHMS)
MSE = functools.partial(query_metric, "mse")


def batch(tasks=3, seed=0):
    return SinusoidTasks(5, 6).sample(tasks, torch.Generator().manual_seed(seed))


def build(name, settings=None, options=None, seed=0):
    torch.manual_seed(seed)
    return ALGORITHMS.get(name).from_config(sinusoid_mlp(), F.mse_loss,
                                            settings or LearnerSettings(), options)


@pytest.mark.parametrize("name", NAMES)
def test_each_algorithm_declares_options_and_capabilities(name):
    cls = ALGORITHMS.get(name)
    assert dataclasses.is_dataclass(cls.Options) and isinstance(cls.capabilities, Capabilities)
    for f in dataclasses.fields(cls.Options):
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
    learner = build(name)
    assert isinstance(learner, Learner)
    loss = learner.meta_gradient(batch())
    assert loss.shape == () and torch.isfinite(loss) and not loss.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    curve = learner.evaluation_curve(batch(seed=1), 3, MSE)
    assert curve.shape == ((3, 4) if cls.capabilities.inner_loop else (3, 1))
    assert torch.isfinite(curve).all() and not curve.requires_grad


def test_options_keep_the_configuration_names():
    assert [f.name for f in dataclasses.fields(MAMLppOptions)] == [
        "mamlpp_multi_step_loss", "mamlpp_msl_epochs", "mamlpp_first_order_epochs",
        "mamlpp_step_lrs", "mamlpp_per_step_bn", "iterations_per_epoch"]
    assert [f.name for f in dataclasses.fields(IMAMLOptions)] == [
        "imaml_lambda", "imaml_cg_iterations", "imaml_inner", "imaml_cg_damping",
        "imaml_lambda_damping"]
    assert [f.name for f in dataclasses.fields(CAVIAOptions)] == ["cavia_context_dim"]
    assert [f.name for f in dataclasses.fields(BlackBoxOptions)] == [
        "blackbox_width", "blackbox_layers", "blackbox_heads"]
    assert [f.name for f in dataclasses.fields(ALGORITHMS.get("reptile").Options)] == [
        "reptile_inner_data", "reptile_inner_batch", "reptile_inner_optimizer"]
    for name in ("maml", "metasgd", "anil", "pretrained"):
        assert ALGORITHMS.get(name).Options is NoOptions


@pytest.mark.parametrize("options, message", [
    (lambda: IMAMLOptions(imaml_cg_iterations=-1),
     "imaml_cg_iterations must be an integer >= 1, got -1"),
    (lambda: IMAMLOptions(imaml_lambda=math.nan), "imaml_lambda must be a finite number > 0"),
    (lambda: IMAMLOptions(imaml_lambda=0.0), "imaml_lambda must be a finite number > 0, got 0.0"),
    (lambda: MAMLppOptions(iterations_per_epoch=0), "iterations_per_epoch must be an integer >= 1"),
    (lambda: MAMLppOptions(mamlpp_msl_epochs=0), "mamlpp_msl_epochs must be an integer >= 1"),
    (lambda: MAMLppOptions(mamlpp_first_order_epochs=-1),
     "mamlpp_first_order_epochs must be an integer >= 0"),
    (lambda: CAVIAOptions(cavia_context_dim=0), "cavia_context_dim must be an integer >= 1"),
    (lambda: BlackBoxOptions(blackbox_layers=0), "blackbox_layers must be an integer >= 1"),
    (lambda: BlackBoxOptions(blackbox_width=10, blackbox_heads=4),
     "blackbox_width=10 must be divisible by blackbox_heads=4"),
])
def test_options_validate_their_ranges(options, message):
    with pytest.raises(ConfigError, match=message):
        options()


def test_from_config_passes_the_options_to_the_learner():
    pp = build("mamlpp", LearnerSettings(inner_lr=0.1, inner_steps=3), MAMLppOptions(
        mamlpp_multi_step_loss=False, mamlpp_msl_epochs=4, mamlpp_first_order_epochs=2,
        mamlpp_step_lrs=False, iterations_per_epoch=7))
    assert (pp.multi_step_loss, pp.msl_epochs, pp.first_order_epochs, pp.iterations_per_epoch,
            pp.inner_rates, pp.inner_steps, pp.inner_lr) == (False, 4, 2, 7, None, 3, 0.1)
    imaml = build("imaml", options=IMAMLOptions(imaml_lambda=2.5, imaml_cg_iterations=3))
    assert (imaml.lam, imaml.cg_iterations) == (2.5, 3)
    bb = build("blackbox", options=BlackBoxOptions(blackbox_width=32, blackbox_heads=2))
    assert bb.embed.out_features == 32 and bb.blocks[0].heads == 2 and bb.classes is None
    torch.manual_seed(0)
    classifier = BlackBox.from_config(Conv4(1, 5, hidden=8), F.cross_entropy,
                                      LearnerSettings(classes=5), None)
    assert classifier.classes == 5
    maml = build("maml", LearnerSettings(first_order=True, learn_inner_lr=True, batching="loop",
                                         transductive=False, checkpoint_inner_steps=True))
    assert maml.first_order and maml.inner_rates is not None and maml.batching == "loop"
    assert not maml.transductive and maml.checkpoint_inner_steps
    with pytest.raises(ConfigError, match="expected NoOptions, got IMAMLOptions"):
        build("maml", options=IMAMLOptions())


def test_cavia_from_config_widens_the_task_network_for_its_context():
    cavia = build("cavia", options=CAVIAOptions(cavia_context_dim=3))
    torch.manual_seed(0)
    sinusoid_mlp()
    today = MLP([1 + 3, 40, 40, 1])  # what the experiment built for CAVIA on sinusoid
    for (n, a), (m, b) in zip(cavia.model.model.named_parameters(), today.named_parameters(),
                              strict=True):
        assert n == m and torch.equal(a, b)
    assert cavia.model.context.shape == (3,)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 5))
    with pytest.raises(ConfigError, match="FiLM"):  # neither an MLP nor a Conv4
        ALGORITHMS.get("cavia").from_config(conv, F.cross_entropy, LearnerSettings(), None)


def test_capabilities_carry_todays_rules():
    def allowed(capability):
        return {n for n in NAMES if getattr(ALGORITHMS.get(n).capabilities, capability)}

    assert allowed("compile") == {"maml", "metasgd", "anil", "cavia"}
    assert allowed("checkpoint_inner_steps") == {"maml", "metasgd", "mamlpp", "cavia"}
    assert "imaml" not in allowed("learn_inner_lr")
    assert allowed("inner_loop") == set(NAMES) - {"blackbox"}
    for capability in ("first_order", "learn_inner_lr", "compile", "batching", "transductive"):
        assert "blackbox" not in allowed(capability)


@pytest.mark.parametrize("name, setting", [
    ("mamlpp", {"compile": True}), ("imaml", {"learn_inner_lr": True}),
    ("reptile", {"checkpoint_inner_steps": True}), ("blackbox", {"first_order": True}),
    ("blackbox", {"batching": "loop"}), ("blackbox", {"transductive": False}),
    ("metasgd", {"learn_inner_lr": True}),
])
def test_from_config_refuses_settings_the_algorithm_cannot_use(name, setting):
    (key, value), = setting.items()
    with pytest.raises(ConfigError, match=f"{ALGORITHMS.get(name).__name__} cannot use "
                                          f"{key}={value!r}"):
        build(name, LearnerSettings(**setting))


def test_a_baseline_uses_the_applicable_settings():
    settings = LearnerSettings(inner_lr=0.05, compile=True, checkpoint_inner_steps=True)
    cls = ALGORITHMS.get("pretrained")
    with pytest.raises(ConfigError, match="compile"):
        build("pretrained", settings)
    applicable = cls.capabilities.applicable(settings)
    assert applicable == LearnerSettings(inner_lr=0.05)
    assert build("pretrained", applicable).inner_lr == 0.05


def test_from_config_moves_the_learner_to_the_device():
    for name in ("mamlpp", "blackbox"):
        learner = build(name, LearnerSettings(device="meta"))
        assert all(t.device.type == "meta" for t in [*learner.parameters(), *learner.buffers()])


class FixedSampler:
    def __init__(self, b):
        self.b = b

    def sample(self, num_tasks, generator):
        return self.b[:num_tasks]


@pytest.mark.parametrize("name", ["maml", "metasgd", "mamlpp", "anil", "imaml", "cavia",
                                  "blackbox"])
def test_evaluation_curve_in_chunks_equals_one_call(name):
    learner = build(name)
    b = batch(tasks=4, seed=2)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    curve = learner.evaluation_curve(b, 3, MSE)
    chunked = evaluation_curves(learner, FixedSampler(b), 4, 3, "mse", torch.Generator(), chunk=4)
    assert torch.equal(curve, chunked)
    assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_curve_at_chosen_steps_equals_those_columns_of_the_full_curve(name):
    learner = build(name)
    b = batch(tasks=4, seed=3)
    full = learner.evaluation_curve(b, 5, MSE)
    sparse = evaluation_curves(learner, FixedSampler(b), 4, 5, "mse", torch.Generator(),
                               at=[0, 2, 5])
    steps = curve_steps(learner, 5, [0, 2, 5])
    assert steps == ([0, 2, 5] if learner.capabilities.inner_loop else [0])
    torch.testing.assert_close(sparse, full[:, steps], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("at", [[], [1, 1], [2, 1], [-1, 0], [0, 6], [0, 1.5], [True]])
def test_steps_to_measure_at_are_checked(at):
    with pytest.raises(ConfigError, match="strictly increasing integers between 0 and"):
        build("maml").evaluation_curve(batch(), 5, MSE, at=at)
