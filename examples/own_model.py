"""Your own model through MAML: a small ResNet with BatchNorm and a custom module, unchanged.

MAML adapts any ``torch.nn.Module`` functionally (its parameters are swapped, never edited), so
residual connections, BatchNorm buffers and custom layers need no rewrite. The data here is
synthetic (each class a random pattern, each example a noisy copy) so that the script runs
anywhere in seconds; swap in ``FewShotTasks(your_dataset, ...)`` for real data.

    python examples/own_model.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import metagrad
from metagrad.tasks.fewshot import FewShotTasks

WAYS, SHOTS, QUERIES = 5, 1, 3


class ChannelGate(nn.Module):
    """A custom module (squeeze-and-excitation): rescales channels by a learned gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.gate(x.mean(dim=(2, 3))))
        return x * weights[:, :, None, None]


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.gate = ChannelGate(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.gate(self.bn2(self.conv2(h))))


class SmallResNet(nn.Module):
    def __init__(self, classes: int, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(Block(channels), nn.MaxPool2d(2), Block(channels),
                                    nn.MaxPool2d(2))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def synthetic_classes(classes: int, items: int, seed: int) -> TensorDataset:
    """``classes`` random 12×12 patterns, ``items`` noisy copies of each."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(classes, 1, 4, 4, generator=g), size=12, mode="bilinear")
    x = patterns.repeat_interleave(items, 0)
    x = x + 0.15 * torch.randn(x.shape, generator=g)
    return TensorDataset(x, torch.arange(classes).repeat_interleave(items))


def main() -> None:
    torch.manual_seed(0)
    train = FewShotTasks(synthetic_classes(60, 10, seed=1), WAYS, SHOTS, QUERIES)
    test = FewShotTasks(synthetic_classes(20, 10, seed=2), WAYS, SHOTS, QUERIES)
    maml = metagrad.MAML(SmallResNet(WAYS), F.cross_entropy, inner_lr=0.4, inner_steps=1)
    optimizer = torch.optim.Adam(maml.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for iteration in range(1, 41):
        optimizer.zero_grad()
        loss = maml.meta_gradient(train.sample(4, generator))  # fills .grad, returns the loss
        optimizer.step()
        if iteration % 10 == 0:
            print(f"iteration {iteration}: query loss {loss.item():.3f}")

    def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output.argmax(-1) == target).float().mean()

    curve = maml.evaluation_curve(test.sample(50, generator), 3, accuracy).mean(0)
    print("held-out classes, accuracy after 0..3 steps: "
          + ", ".join(f"{100 * a:.1f}%" for a in curve.tolist()))


if __name__ == "__main__":
    main()
