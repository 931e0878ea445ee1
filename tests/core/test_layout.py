"""Channels-last inputs (metagrad.core.layout): the same meta-gradient in either layout, the
layout given to exactly the forwards the policy names, refused or ignored where it must be, and
training as good as the contiguous layout."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import accuracy_after_training

from metagrad import MAML
from metagrad.algorithms.base import LearnerSettings
from metagrad.algorithms.blackbox import BlackBox
from metagrad.core.layout import channels_last_safe, exactly_channels_last
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4


def image_tasks(tasks: int = 2, ways: int = 5, queries: int = 5, channels: int = 1,
                dtype: torch.dtype = torch.float32, seed: int = 0, noise: float = 0.3
                ) -> TaskBatch:
    """Omniglot-shaped tasks (1 shot, ``queries`` per class: looped by ``batching="auto"``)
    whose classes are noisy copies of a per-task prototype."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(tasks, ways, channels, 28, 28, generator=g).round()
    sx = prototypes + noise * torch.randn(prototypes.shape, generator=g)
    qx = prototypes.repeat_interleave(queries, 1) \
        + noise * torch.randn(tasks, ways * queries, channels, 28, 28, generator=g)
    return TaskBatch(sx, torch.arange(ways).repeat(tasks, 1), qx,
                     torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)).to(
        dtype=dtype)


def meta_gradient(memory_format: str, dtype: torch.dtype = torch.float32, pooling: str = "stride",
                  **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=16, pooling=pooling).to(dtype)
    learner = MAML(model, F.cross_entropy, inner_lr=0.4, memory_format=memory_format, **kwargs)
    learner.meta_gradient(image_tasks(dtype=dtype))
    return torch.cat([p.grad.flatten() for p in learner.parameters()])


@pytest.mark.parametrize("pooling", ["stride", "max"])
@pytest.mark.parametrize("first_order,steps", [(False, 1), (False, 2), (True, 2)])
def test_channels_last_is_the_same_meta_gradient(pooling, first_order, steps):
    """In float64 the layout changes no value; in float32 only the rounding of other kernels."""
    settings = dict(pooling=pooling, first_order=first_order, inner_steps=steps)
    exact = meta_gradient("contiguous", torch.float64, **settings)
    torch.testing.assert_close(meta_gradient("channels_last", torch.float64, **settings), exact,
                               rtol=0, atol=1e-12)
    for memory_format in ("contiguous", "channels_last"):
        g = meta_gradient(memory_format, **settings).double()
        assert (g - exact).abs().max() <= 1e-3 * exact.abs().max(), memory_format
        assert F.cosine_similarity(g, exact, dim=0) >= 0.9999


def first_conv_inputs(learner: MAML, batch: TaskBatch, **call) -> list[str]:
    """The layout of every input the model's first convolution received during one
    meta-gradient (``call``: keyword arguments of ``evaluation_curve`` to run that instead)."""
    seen: list[str] = []

    def record(module, args):
        x = args[0]
        n, c, h, w = x.shape
        try:
            exact = x.stride() == (h * w * c, 1, w * c, c)
        except RuntimeError:  # a tensor batched by vmap has no strides of its own
            exact = False
        seen.append(f"{n}:{'nhwc' if exact else 'nchw'}")

    handle = learner.model.features.conv0.register_forward_pre_hook(record)
    try:
        if call:
            learner.evaluation_curve(batch, **call)
        else:
            learner.meta_gradient(batch)
    finally:
        handle.remove()
    return seen


def test_auto_converts_the_query_forwards_only():
    batch = image_tasks(tasks=1)  # 5 support and 25 query images: looped
    for first_order in (False, True):
        learner = MAML(Conv4(1, 5, hidden=8), F.cross_entropy, inner_lr=0.4,
                       first_order=first_order)
        assert first_conv_inputs(learner, batch) == ["5:nchw", "25:nhwc"]
    metric = lambda out, y: (out.argmax(-1) == y).float().mean()  # noqa: E731
    assert first_conv_inputs(learner, batch, max_steps=1, metric=metric) \
        == ["5:nchw", "25:nhwc", "25:nhwc"]  # evaluation: 1 step, queries at 0 and 1 steps
    off = MAML(Conv4(1, 5, hidden=8), F.cross_entropy, inner_lr=0.4, memory_format="contiguous")
    assert first_conv_inputs(off, batch) == ["5:nchw", "25:nchw"]


def test_vmapped_tasks_are_not_converted():
    learner = MAML(Conv4(1, 5, hidden=8), F.cross_entropy, inner_lr=0.4, batching="vmap")
    assert all(s.endswith("nchw") for s in first_conv_inputs(learner, image_tasks(queries=1)))


class ViewsItsFeatures(nn.Module):
    """A user's model that ``.view``s its activations: NHWC activations would fail there."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(4 * 13 * 13, 5)

    def forward(self, x):
        h = self.features(x)
        return self.head(h.view(h.shape[0], -1))


def test_auto_leaves_models_of_unknown_code_alone():
    assert channels_last_safe(Conv4(1, 5)) and not channels_last_safe(ViewsItsFeatures())
    learner = MAML(ViewsItsFeatures(), F.cross_entropy, inner_lr=0.1)
    assert not learner.layout.channels_last
    learner.meta_gradient(image_tasks(channels=3))  # runs, contiguous
    forced = MAML(ViewsItsFeatures(), F.cross_entropy, inner_lr=0.1,
                  memory_format="channels_last", first_order=True)
    with pytest.raises(ConfigError, match="view size"):  # the user vouched for the model
        forced.meta_gradient(image_tasks(channels=3))
    mlp = MAML(nn.Sequential(nn.Linear(3, 3)), F.mse_loss)
    assert not mlp.layout.channels_last  # no convolution: nothing to gain


def test_exactly_channels_last_handles_one_channel():
    x = torch.randn(4, 1, 6, 6)
    assert x.is_contiguous(memory_format=torch.channels_last)  # ambiguous with one channel
    y = exactly_channels_last(x)
    assert y.stride() == (36, 1, 6, 1) and torch.equal(x, y)
    assert exactly_channels_last(y) is y
    out = F.conv2d(y, torch.randn(8, 1, 3, 3))
    assert out.stride(1) == 1  # so the convolution's output is channels-last too


def test_memory_format_setting_reaches_the_learner_or_is_refused():
    with pytest.raises(ConfigError, match="memory_format must be one of"):
        MAML(Conv4(1, 5), F.cross_entropy, memory_format="nhwc")
    learner = MAML.from_config(Conv4(1, 5), F.cross_entropy,
                               LearnerSettings(memory_format="contiguous"))
    assert learner.memory_format == "contiguous" and not learner.layout.channels_last
    with pytest.raises(ConfigError, match="memory_format='channels_last'"):
        BlackBox.capabilities.check(LearnerSettings(memory_format="channels_last"), "blackbox")
    BlackBox.capabilities.check(LearnerSettings(), "blackbox")  # "auto" has nothing to refuse


# -- training in channels-last reaches the contiguous layout's accuracy ----------------------
def trained_accuracy(memory_format: str, iterations: int = 60) -> tuple[float, float]:
    torch.manual_seed(0)
    learner = MAML(Conv4(1, 5, hidden=16), F.cross_entropy, inner_lr=0.4,
                   memory_format=memory_format)
    return accuracy_after_training(
        learner, lambda i: image_tasks(tasks=4, seed=1 + i, noise=0.6),
        image_tasks(tasks=100, seed=10_000, noise=0.6), iterations)


def test_channels_last_training_reaches_the_contiguous_accuracy():
    contiguous, ci_c = trained_accuracy("contiguous")
    channels_last, ci_l = trained_accuracy("channels_last")
    untrained, _ = trained_accuracy("contiguous", iterations=0)
    assert contiguous > untrained + 0.2  # the training did learn
    assert abs(channels_last - contiguous) <= math.hypot(ci_c, ci_l), (contiguous, channels_last)
