"""The paper's Conv4: output shapes for both variants, layer names, plain BatchNorm modules."""

import pytest
import torch
from torch import nn

from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4, miniimagenet_conv, omniglot_conv

torch.set_num_threads(1)


def test_omniglot_variant():
    model = omniglot_conv(5)
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    assert model.head.in_features == 64  # 2x2x64 feature map averaged over space
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [m.stride for m in model.modules() if isinstance(m, nn.Conv2d)] == [(2, 2)] * 4
    assert model.features(torch.rand(1, 1, 28, 28)).shape == (1, 64, 2, 2)


def test_miniimagenet_variant():
    model = miniimagenet_conv(5)
    assert model.features(torch.rand(2, 3, 84, 84)).shape == (2, 32, 5, 5)
    assert model.head.in_features == 5 * 5 * 32
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_plain_modules_and_head_name():
    model = Conv4(1, 20, hidden=8, pooling="max", input_size=28, readout="flatten")
    assert model.head.in_features == 8  # 28 -> 14 -> 7 -> 3 -> 1
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(b.track_running_stats and b.momentum == 0.1 for b in bns)
    assert [n for n, _ in model.named_parameters() if n.startswith("head.")] == [
        "head.weight", "head.bias"]
    assert Conv4(1, 5, readout="flatten").head.in_features == 64 * 2 * 2


def test_bad_settings():
    with pytest.raises(ConfigError, match="pooling"):
        Conv4(1, 5, pooling="avg")
    with pytest.raises(ConfigError, match="too small"):
        Conv4(3, 5, pooling="max", input_size=8)
