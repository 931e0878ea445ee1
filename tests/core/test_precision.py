"""Mixed precision (metagrad.core.precision): bf16 meta-gradients close to float32, float32
unchanged, float16 refused without CUDA, and bf16 training as good as float32."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import accuracy_after_training

from metagrad import MAML
from metagrad.algorithms.base import Capabilities, LearnerSettings
from metagrad.core.precision import PrecisionPolicy
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError
from metagrad.models.conv import omniglot_conv

pytestmark = pytest.mark.filterwarnings("ignore:precision='bf16' on a CPU:RuntimeWarning")


def omniglot_batch(tasks: int = 2, ways: int = 5, queries: int = 3) -> TaskBatch:
    """Omniglot-shaped tasks (28x28, 1 shot) whose classes are noisy copies of a prototype."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(tasks, ways, 1, 28, 28, generator=g).round()
    sx = prototypes + 0.3 * torch.randn(prototypes.shape, generator=g)
    qx = prototypes.repeat_interleave(queries, 1) \
        + 0.3 * torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    return TaskBatch(sx, torch.arange(ways).repeat(tasks, 1), qx,
                     torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))


def meta_gradient(precision: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, MAML]:
    torch.manual_seed(0)
    learner = MAML(omniglot_conv(5), F.cross_entropy, inner_lr=0.4, precision=precision, **kwargs)
    loss = learner.meta_gradient(omniglot_batch())
    return torch.cat([p.grad.flatten() for p in learner.parameters()]), loss, learner


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_bf16_meta_gradient_is_close_to_fp32(first_order, steps):
    reference, ref_loss, _ = meta_gradient("fp32", inner_steps=steps, first_order=first_order)
    g, loss, learner = meta_gradient("bf16", inner_steps=steps, first_order=first_order)
    assert g.dtype == torch.float32
    error = (g - reference).abs().max() / reference.abs().max()
    assert error <= 0.1, error
    assert F.cosine_similarity(g, reference, dim=0) >= 0.99
    assert loss.dtype == torch.float32 and abs(loss - ref_loss) <= 0.02 * ref_loss
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert not torch.equal(g, reference)  # the query pass did run in bfloat16


def test_bf16_keeps_batch_norm_statistics_and_learned_rates_float32():
    torch.manual_seed(0)
    learner = MAML(omniglot_conv(5), F.cross_entropy, inner_lr=0.4, learn_inner_lr=True,
                   transductive=False, precision="bf16")
    before = learner.model.features.bn0.running_mean.clone()
    learner.meta_gradient(omniglot_batch())
    for name, tensor in [*learner.named_parameters(), *learner.named_buffers()]:
        assert tensor.dtype in (torch.float32, torch.int64), name
    assert not torch.equal(learner.model.features.bn0.running_mean, before)
    assert all(p.grad.dtype == torch.float32 for p in learner.parameters())


def test_inner_loop_in_bf16_is_what_loses_accuracy():
    """The policy's reason: the same step with the inner loop in bfloat16 is much further from
    float32 than with only the query pass in bfloat16."""
    reference, _, _ = meta_gradient("fp32")
    query_only, _, _ = meta_gradient("bf16")
    torch.manual_seed(0)
    everywhere = MAML(omniglot_conv(5), F.cross_entropy, inner_lr=0.4, precision="bf16")
    everywhere.policy = PrecisionPolicy(torch.bfloat16, support=True, query=True)
    everywhere.meta_gradient(omniglot_batch())
    g = torch.cat([p.grad.flatten() for p in everywhere.parameters()])
    assert (g - reference).norm() > 2 * (query_only - reference).norm()


def test_fp32_is_the_plain_autograd_loop_bit_for_bit(monkeypatch):
    """precision="fp32" (the default) computes exactly what a plain per-task autograd loop does
    (looped tasks in the contiguous layout, bit for bit), and never enters autocast."""
    torch.manual_seed(0)
    model = omniglot_conv(5)
    names, params = zip(*model.named_parameters(), strict=True)
    sx, sy, qx, qy = omniglot_batch().tensors()
    for i in range(sx.shape[0]):
        fast = list(params)
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            loss = F.cross_entropy(torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (sx[i],)), sy[i])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - 0.4 * g for w, g in zip(fast, grads, strict=True)]
            (F.cross_entropy(torch.func.functional_call(
                model, dict(zip(names, fast, strict=True)), (qx[i],)), qy[i]) / 2).backward()
    reference = torch.cat([p.grad.flatten() for p in params])

    def refuse(*args, **kwargs):
        raise AssertionError("float32 entered autocast")

    monkeypatch.setattr(torch, "autocast", refuse)
    looped, _, _ = meta_gradient("fp32", batching="loop", memory_format="contiguous")
    assert torch.equal(looped, reference)
    torch.manual_seed(0)
    implicit = MAML(omniglot_conv(5), F.cross_entropy, inner_lr=0.4, batching="loop",
                    memory_format="contiguous")
    implicit.meta_gradient(omniglot_batch())
    assert torch.equal(torch.cat([p.grad.flatten() for p in implicit.parameters()]), reference)
    # by default looped query passes run channels-last (metagrad.core.layout): other kernels,
    # the same gradient up to float32 rounding
    channels_last, _, _ = meta_gradient("fp32", batching="loop")
    torch.testing.assert_close(channels_last, reference, rtol=0,
                               atol=1e-3 * reference.abs().max())
    # tasks this small are vmapped by default: the same gradient up to float32 rounding
    batched, _, _ = meta_gradient("fp32")
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-3 * reference.abs().max())


def test_loss_scale_scales_the_meta_gradient_not_the_loss():
    reference, ref_loss, _ = meta_gradient("fp32")
    torch.manual_seed(0)
    learner = MAML(omniglot_conv(5), F.cross_entropy, inner_lr=0.4)
    learner.loss_scale = lambda loss: loss * 1024.0
    loss = learner.meta_gradient(omniglot_batch())
    assert torch.equal(loss, ref_loss)
    assert torch.equal(torch.cat([p.grad.flatten() for p in learner.parameters()]),
                       reference * 1024.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="float16 is allowed with CUDA")
def test_fp16_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        MAML(nn.Linear(2, 2), F.mse_loss, precision="fp16")
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        MAML.from_config(nn.Linear(2, 2), F.mse_loss, LearnerSettings(precision="fp16"))


def test_unknown_precision_and_compile_are_refused():
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        MAML(nn.Linear(2, 2), F.mse_loss, precision="float16")
    with pytest.raises(ConfigError, match="compile"):
        MAML(nn.Linear(2, 2), F.mse_loss, precision="bf16", compile=True)


def test_bf16_on_cpu_without_bf16_kernels_warns():
    learner = MAML(nn.Linear(2, 2), F.mse_loss, precision="bf16")
    batch = TaskBatch(torch.randn(1, 3, 2), torch.randn(1, 3, 2), torch.randn(1, 3, 2),
                      torch.randn(1, 3, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.meta_gradient(batch)
    slow = any("without bfloat16 kernels" in str(w.message) for w in caught)
    assert slow == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())


# -- bf16 training reaches float32's accuracy ------------------------------------------------
def gaussian_tasks(tasks: int, generator: torch.Generator, shots: int = 1, queries: int = 15,
                   ways: int = 5, dim: int = 16) -> TaskBatch:
    """5-way tasks whose classes are Gaussian clusters around means drawn per task."""
    means = 2.0 * torch.randn(tasks, ways, 1, dim, generator=generator)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = means + torch.randn(tasks, ways, n, dim, generator=generator)
        return x.flatten(1, 2), torch.arange(ways).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*draw(shots), *draw(queries))


def trained_accuracy(precision: str, iterations: int = 150) -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    learner = MAML(model, F.cross_entropy, inner_lr=0.05, precision=precision)
    g = torch.Generator().manual_seed(1)
    return accuracy_after_training(learner, lambda _: gaussian_tasks(8, g),
                                   gaussian_tasks(300, torch.Generator().manual_seed(2)),
                                   iterations)


def test_bf16_training_reaches_fp32_accuracy():
    fp32, ci32 = trained_accuracy("fp32")
    bf16, ci16 = trained_accuracy("bf16")
    untrained, _ = trained_accuracy("fp32", iterations=0)
    assert fp32 > untrained + 0.3  # the training did learn
    assert abs(bf16 - fp32) <= math.hypot(ci32, ci16), (fp32, bf16, ci32, ci16)


def test_precision_setting_reaches_the_learner_or_is_refused():
    learner = MAML.from_config(nn.Linear(2, 2), F.mse_loss, LearnerSettings(precision="bf16"))
    assert learner.precision == "bf16" and learner.policy.query and not learner.policy.support
    with pytest.raises(ConfigError, match="precision='bf16'"):
        Capabilities(precision=False).check(LearnerSettings(precision="bf16"), "BlackBox")
    Capabilities(precision=False).check(LearnerSettings(), "BlackBox")
