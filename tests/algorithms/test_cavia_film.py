"""CAVIA on convolutional networks: the context reaches the third block through a FiLM layer
(Zintgraf et al. 2019, §4.2): its meta-gradient against finite differences (float64), and a
short training on Omniglot-shaped synthetic tasks in which adapting the context alone learns."""

import pytest
import torch
import torch.nn.functional as F
from gradcheck import central_differences

from metagrad.algorithms.base import LearnerSettings
from metagrad.algorithms.cavia import CAVIA, CAVIAOptions
from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4
from metagrad.models.film import FiLM, with_film_context

DT = torch.float64


def image_tasks(n, ways, shots, queries, size, generator, dtype=torch.float32, noise=0.3):
    """``n`` tasks of ``ways`` classes; a class is a random binary image, its examples that image
    plus Gaussian noise; labels are a random permutation per task (as in Omniglot episodes)."""
    protos = (torch.rand(n, ways, 1, 1, size, size, generator=generator) > 0.5).to(dtype)

    def draw(k):
        x = protos + noise * torch.randn(n, ways, k, 1, size, size, generator=generator,
                                         dtype=dtype)
        y = torch.arange(ways).view(1, ways, 1).expand(n, ways, k)
        return x.flatten(1, 2), y.flatten(1, 2)

    (sx, sy), (qx, qy) = draw(shots), draw(queries)
    perm = torch.stack([torch.randperm(ways, generator=generator) for _ in range(n)])
    return TaskBatch(sx, perm.gather(1, sy), qx, perm.gather(1, qy))


def test_from_config_inserts_one_film_layer_after_the_third_blocks_batch_norm():
    torch.manual_seed(0)
    cavia = CAVIA.from_config(Conv4(1, 5, hidden=8), F.cross_entropy, LearnerSettings(),
                              CAVIAOptions(cavia_context_dim=7))
    names = [n for n, _ in cavia.model.features.named_children()]
    assert names[names.index("bn2") + 1] == "film2" and names[names.index("film2") + 1] == "relu2"
    film = cavia.model.features.film2
    assert film.context.shape == (7,) and film.generator.out_features == 16
    assert cavia.adapted_names == ["features.film2.context"]
    assert not film.context.requires_grad  # adapted, never meta-learned
    with pytest.raises(ConfigError, match="context_dim=3 differs"):
        CAVIA(cavia.model, F.cross_entropy, context_dim=3)
    with pytest.raises(ConfigError, match="FiLM"):
        with_film_context(torch.nn.Linear(2, 2), 3)


def test_film_scales_and_shifts_each_channel():
    film = FiLM(3, 2).to(DT)
    h = torch.randn(4, 2, 5, 5, dtype=DT)
    with torch.no_grad():
        film.context.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=DT))
    gamma_beta = film.generator.weight @ film.context + film.generator.bias
    expected = gamma_beta[:2].view(1, 2, 1, 1) * h + gamma_beta[2:].view(1, 2, 1, 1)
    torch.testing.assert_close(film(h), expected)


@pytest.mark.parametrize("first_order", [False, True])
def test_film_meta_gradient_matches_finite_differences(first_order):
    torch.manual_seed(0)
    model = with_film_context(Conv4(1, 3, hidden=3, input_size=16).to(DT), 2)
    learner = CAVIA(model, F.cross_entropy, inner_lr=0.5, inner_steps=2, first_order=first_order)
    batch = image_tasks(2, 3, 2, 2, 16, torch.Generator().manual_seed(0), dtype=DT)
    assert learner.adapt(batch.support_x[0], batch.support_y[0])[
        "features.film2.context"].dtype == DT
    theta = [p for p in learner.parameters() if p.requires_grad]
    learner.zero_grad()
    learner.meta_loss(*batch.tensors()).backward()
    got = torch.cat([p.grad.reshape(-1) for p in theta])
    if first_order:  # θ' = θ: the query loss at the adapted (then constant) context
        context = model.features.film2.context
        phis = [learner.adapt(sx, sy)["features.film2.context"].detach()
                for sx, sy in zip(batch.support_x, batch.support_y, strict=True)]

        def loss():
            total = 0
            for phi, qx, qy in zip(phis, batch.query_x, batch.query_y, strict=True):
                with torch.no_grad():
                    context.copy_(phi)
                total = total + learner.loss(learner.params(), qx, qy)
            with torch.no_grad():
                context.zero_()
            return total / batch.num_tasks
    else:
        def loss():
            return learner.meta_loss(*batch.tensors())
    numeric = central_differences(loss, theta)
    torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-8)
    generator = model.features.film2.generator
    assert generator.weight.grad.abs().max() > 1e-4  # θ learns through the context's step
    assert model.features.film2.context.grad is None


def test_short_omniglot_shaped_training_adapts_the_context():
    """5-way 1-shot, 28×28 one-channel images; labels permuted per task, so before adaptation
    (φ = 0) the network is at chance, and only φ's inner steps can tell the classes apart."""
    torch.manual_seed(0)
    cavia = CAVIA.from_config(Conv4(1, 5, hidden=16), F.cross_entropy,
                              LearnerSettings(inner_lr=1.0, inner_steps=2, first_order=True),
                              CAVIAOptions(cavia_context_dim=32))
    optimizer = torch.optim.Adam(cavia.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        optimizer.zero_grad()
        cavia.meta_gradient(image_tasks(8, 5, 1, 3, 28, generator))
        optimizer.step()
    test = image_tasks(50, 5, 1, 5, 28, torch.Generator().manual_seed(1))

    def accuracy(out, y):
        return (out.argmax(-1) == y).float().mean()

    curve = cavia.evaluation_curve(test, 2, accuracy).mean(0)
    assert curve[0] < 0.3, curve  # chance is 0.2
    # each step of φ helps, and two of them lift the accuracy 15 points above chance
    assert curve[2] > curve[1] > curve[0] and curve[2] > curve[0] + 0.15, curve
