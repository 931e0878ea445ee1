"""FiLM context layers: how CAVIA's context vector reaches a convolutional network (Zintgraf et
al. 2019, §4.2; feature-wise linear modulation of Perez et al. 2018).

A learned linear map of the context φ gives a scale and a shift per channel,

    [γ; β] = W φ + b,    FiLM(h) = γ ⊙ h + β   (per channel of h: [N, C, ...]),

W and b being meta-learned and φ (0 outside adaptation) the only adapted tensor. As in the paper's
image experiments (and its code's default), one FiLM layer follows the BatchNorm of the third
convolutional block, before its ReLU (:func:`with_film_context`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from metagrad.errors import ConfigError

FILM_BLOCK = 2
"""The block of :class:`~metagrad.models.conv.Conv4` (0-based) after whose BatchNorm the FiLM
layer goes: the third."""


class FiLM(nn.Module):
    """``γ ⊙ h + β`` per channel, ``[γ; β] = generator(context)``; ``context`` (φ, of size
    ``context_dim``) is a parameter that stays 0 outside adaptation (it is not meta-learned)."""

    vmap_exact_forward = True  # a view, a product and a sum (the generator is an nn.Linear)

    def __init__(self, context_dim: int, channels: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.context = nn.Parameter(torch.zeros(context_dim, dtype=dtype, device=device),
                                    requires_grad=False)
        self.generator = nn.Linear(context_dim, 2 * channels, dtype=dtype, device=device)

    def forward(self, h: Tensor) -> Tensor:
        if h.dim() < 2 or h.shape[1] != self.channels:
            raise ConfigError(f"FiLM modulates {self.channels} channels (dimension 1); got "
                              f"features of shape {tuple(h.shape)}")
        gamma, beta = self.generator(self.context).view(
            2, self.channels, *([1] * (h.dim() - 2))).unbind(0)
        return gamma * h + beta


def with_film_context(model: nn.Module, context_dim: int, block: int = FILM_BLOCK) -> nn.Module:
    """``model`` (changed in place and returned) with a :class:`FiLM` layer named
    ``film{block}`` inserted into ``model.features`` right after ``bn{block}``, in the dtype and
    on the device of that BatchNorm: the layout of :class:`~metagrad.models.conv.Conv4`."""
    features = getattr(model, "features", None)
    norm = getattr(features, f"bn{block}", None)
    if not isinstance(features, nn.Sequential) or not isinstance(norm, nn.BatchNorm2d):
        raise ConfigError(f"FiLM context layers go after the BatchNorm 'features.bn{block}' of a "
                          f"Conv4-like model; {type(model).__name__} has none")
    film = FiLM(context_dim, norm.num_features, dtype=norm.weight.dtype, device=norm.weight.device)
    layers: list[tuple[str, nn.Module]] = []
    for name, layer in features.named_children():
        layers.append((name, layer))
        if name == f"bn{block}":
            layers.append((f"film{block}", film))
    model.features = nn.Sequential(OrderedDict(layers))
    return model
