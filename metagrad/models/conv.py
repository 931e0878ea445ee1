"""The convolutional classifier of MAML §5.2 (Finn et al. 2017; architecture of Vinyals et al.
2016): four blocks of [3×3 conv, BatchNorm, ReLU], then a linear layer named ``head``.

* Omniglot: 64 filters, stride-2 convolutions (28 → 14 → 7 → 4 → 2); as in the reference code
  the 2×2×64 feature map is averaged over space before the head.
* MiniImageNet: 32 filters, stride-1 convolutions each followed by 2×2 max-pooling
  (84 → 42 → 21 → 10 → 5); the 5×5×32 = 800 features are flattened into the head.

The model is an ordinary module (BatchNorm tracks running statistics); how BatchNorm behaves
during adaptation is the meta-learner's policy, not the model's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import Tensor, nn

from metagrad.errors import ConfigError


class Conv4(nn.Module):
    """``[N, in_channels, input_size, input_size]`` → logits ``[N, num_classes]``.

    ``readout="auto"`` averages the final feature map over space for ``pooling="stride"`` and
    flattens it for ``pooling="max"`` (the reference code's choices); ``"mean"`` or
    ``"flatten"`` forces one.
    """

    vmap_exact_forward = True
    """Its own forward only chains its layers with a mean or flatten, which batch exactly
    (:func:`metagrad.core.batching.vmap_is_exact`); its layers are checked one by one."""
    channels_last_safe = True
    """The mean and flatten of its forward read any layout
    (:func:`metagrad.core.layout.channels_last_safe`)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64,
                 pooling: Literal["stride", "max"] = "stride", input_size: int = 28,
                 readout: Literal["auto", "mean", "flatten"] = "auto") -> None:
        super().__init__()
        if pooling not in ("stride", "max"):
            raise ConfigError(f"Conv4 pooling must be 'stride' or 'max', got {pooling!r}")
        if readout not in ("auto", "mean", "flatten"):
            raise ConfigError(f"Conv4 readout must be 'auto', 'mean' or 'flatten', got {readout!r}")
        if min(in_channels, num_classes, hidden) < 1:
            raise ConfigError("Conv4 needs in_channels, num_classes and hidden >= 1, got "
                              f"{in_channels}, {num_classes}, {hidden}")
        size = input_size
        blocks: list[tuple[str, nn.Module]] = []
        for i in range(4):
            stride = 2 if pooling == "stride" else 1
            blocks += [(f"conv{i}", nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3,
                                              stride=stride, padding=1)),
                       (f"bn{i}", nn.BatchNorm2d(hidden)),
                       (f"relu{i}", nn.ReLU())]
            if pooling == "max":
                blocks.append((f"pool{i}", nn.MaxPool2d(2)))
            size = (size - 1) // 2 + 1 if pooling == "stride" else size // 2
            if size < 1:
                raise ConfigError(f"Conv4 input_size={input_size} is too small for four "
                                  f"{pooling} halvings; use images of at least 16x16 pixels")
        self.features = nn.Sequential(OrderedDict(blocks))
        if readout == "auto":
            readout = "mean" if pooling == "stride" else "flatten"
        self.readout = readout
        self.feature_size = hidden if readout == "mean" else hidden * size * size
        self.head = nn.Linear(self.feature_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        h = h.mean(dim=(2, 3)) if self.readout == "mean" else h.flatten(1)
        return self.head(h)


def omniglot_conv(ways: int, image_size: int = 28) -> Conv4:
    """The paper's Omniglot network: 64 filters, strided convolutions, 1 input channel."""
    return Conv4(1, ways, hidden=64, pooling="stride", input_size=image_size)


def miniimagenet_conv(ways: int, image_size: int = 84) -> Conv4:
    """The paper's MiniImageNet network: 32 filters, max-pooling, 3 input channels."""
    return Conv4(3, ways, hidden=32, pooling="max", input_size=image_size)
