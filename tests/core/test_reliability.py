"""Never a silently wrong result: settings and data that would give one are refused with a
message that names the problem."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metagrad import ANIL, CAVIA, IMAML, MAML, MAMLpp, MetaSGD
from metagrad.errors import ConfigError

DT = torch.float64


def layer_norm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def regression(tasks=2, n=5, y_shape=(1,)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, n, 2, generator=g, dtype=DT)
    return x, torch.randn(tasks, n, *y_shape, generator=g, dtype=DT), x.clone(), \
        torch.randn(tasks, n, *y_shape, generator=g, dtype=DT)


def test_forced_vmap_through_a_layer_not_verified_in_second_order_is_refused():
    with pytest.raises(ConfigError, match=r"second order for layer '1' \(LayerNorm\).*'auto'.*'loop'"):
        MAML(layer_norm_net(), F.mse_loss, 0.1, batching="vmap")
    with pytest.raises(ConfigError, match=r"LayerNorm"):  # iMAML: Hessian-vector products
        IMAML(layer_norm_net(), F.mse_loss, 0.1, batching="vmap")
    # first order through LayerNorm is verified: allowed, and equal to the loop
    data = regression()
    got = []
    for batching in ("vmap", "loop"):
        maml = MAML(layer_norm_net(), F.mse_loss, 0.1, first_order=True, batching=batching)
        maml.meta_loss(*data).backward()
        got.append([p.grad for p in maml.parameters()])
    for a, b in zip(*got, strict=True):
        torch.testing.assert_close(a, b)
    # switched to second order after construction: refused when the meta-gradient is taken
    maml = MAML(layer_norm_net(), F.mse_loss, 0.1, first_order=True, batching="vmap")
    maml.first_order = False
    with pytest.raises(ConfigError, match="LayerNorm"):
        maml.meta_loss(*data)
    # "auto" loops instead: the exact meta-gradient
    MAML(layer_norm_net(), F.mse_loss, 0.1).meta_loss(*data).backward()


def test_targets_that_would_broadcast_against_the_output_are_refused():
    sx, sy, qx, qy = regression(y_shape=())  # targets [tasks, N] for outputs [N, 1]
    maml = MAML(layer_norm_net(), F.mse_loss, 0.1)
    with pytest.raises(ConfigError, match=r"output \(5, 1\) and the targets \(5,\).*broadcast to "
                                          r"\(5, 5\)"):
        maml.meta_loss(sx, sy, qx, qy)
    with pytest.raises(ConfigError, match="broadcast"):
        maml.adapt(sx[0], sy[0])
    with pytest.raises(ConfigError, match="broadcast"):
        ANIL(layer_norm_net(), F.mse_loss, 0.1, head="3").adapt(sx[0], sy[0])
    # class indices against logits are not a broadcast
    logits = nn.Sequential(nn.Linear(2, 3)).to(DT)
    labels = torch.randint(0, 3, (2, 5))
    MAML(logits, F.cross_entropy, 0.1).meta_loss(sx, labels, qx, labels).backward()


@pytest.mark.parametrize("lr", [math.nan, math.inf, -0.1, 0.0, "0.1", None, True])
def test_inner_lr_must_be_a_finite_positive_number(lr):
    with pytest.raises(ConfigError, match=f"inner_lr must be a finite number > 0, got {lr!r}"):
        MAML(layer_norm_net(), F.mse_loss, lr)


def test_a_model_with_every_parameter_frozen_is_refused():
    net = layer_norm_net().requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter of the model has requires_grad=False"):
        MAML(net, F.mse_loss, 0.1)
    net[3].requires_grad_(True)  # some frozen is fine
    MAML(net, F.mse_loss, 0.1)


def test_arguments_that_an_algorithm_would_drop_are_refused():
    net = layer_norm_net
    with pytest.raises(ConfigError, match="ANIL adapts the head only"):
        ANIL(net(), F.mse_loss, 0.1, head="3", adapt="0")
    with pytest.raises(ConfigError, match="CAVIA adapts only its context"):
        CAVIA(nn.Linear(4, 1), F.mse_loss, context_dim=2, adapt="model")
    with pytest.raises(ConfigError, match="Meta-SGD learns its per-element inner rates"):
        MetaSGD(net(), F.mse_loss, 0.1, learn_inner_lr=False)
    assert MetaSGD(net(), F.mse_loss, 0.1, learn_inner_lr=True).inner_rates is not None
    with pytest.raises(ConfigError, match="MAML\\+\\+ learns one inner rate per layer and step"):
        MAMLpp(net(), F.mse_loss, 0.1, learn_inner_lr=True)
    with pytest.raises(ConfigError, match="first_order does not apply"):
        IMAML(net(), F.mse_loss, 0.1, first_order=True)

