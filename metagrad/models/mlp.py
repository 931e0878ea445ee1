"""Fully connected networks: the sinusoid regressor of MAML §5.1 (1-40-40-1, ReLU) and the
paper's non-convolutional Omniglot classifier (256-128-64-64, BatchNorm, ReLU; appendix A.1)."""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise

from torch import nn


class MLP(nn.Sequential):
    """``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ReLU (and optionally BatchNorm) between
    layers; the last layer is named ``head`` (what ANIL adapts). Inputs are flattened first."""

    def __init__(self, sizes: list[int] | tuple[int, ...], batch_norm: bool = False) -> None:
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP needs at least two positive layer sizes, got {sizes}")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (a, b) in enumerate(pairwise(sizes[:-1])):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if batch_norm:
                layers.append((f"bn{i}", nn.BatchNorm1d(b)))
            layers.append((f"relu{i}", nn.ReLU()))
        layers.append(("head", nn.Linear(sizes[-2], sizes[-1])))
        super().__init__(OrderedDict(layers))


def sinusoid_mlp() -> MLP:
    """The regressor of MAML §5.1: two hidden layers of 40 units with ReLU."""
    return MLP([1, 40, 40, 1])


def omniglot_mlp(ways: int, image_size: int = 28) -> MLP:
    """The paper's non-convolutional network: 256-128-64-64 with BatchNorm and ReLU."""
    return MLP([image_size * image_size, 256, 128, 64, 64, ways], batch_norm=True)
