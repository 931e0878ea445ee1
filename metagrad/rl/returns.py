"""Discounted returns and generalised advantage estimation (Schulman et al. 2016, Eq. 16) on
padded batches of episodes.

Time is the last dimension: ``rewards``, ``values`` and ``masks`` are ``[..., T]``. ``masks`` is 1
on the steps an episode took and 0 on the padding after it ended; an episode's valid steps are a
prefix. The value after the last valid step is taken as 0 (episodes end or are cut at the horizon,
as in the MAML paper's code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagrad.errors import ConfigError


def _discount_matrix(T: int, factor: float, like: Tensor) -> Tensor:
    """M[j, t] = factor^(j-t) for j ≥ t, else 0, so that ``x @ M`` sums Σ_{j≥t} factor^(j-t) x_j."""
    idx = torch.arange(T, device=like.device)
    power = (idx[:, None] - idx[None, :]).to(like.dtype)
    base = torch.tensor(factor, dtype=like.dtype, device=like.device)
    return torch.tril(base.pow(power.clamp(min=0)))


def _check_masks(rewards: Tensor, masks: Tensor) -> None:
    if rewards.shape != masks.shape:
        raise ConfigError(
            f"rewards {tuple(rewards.shape)} and masks {tuple(masks.shape)} must have the same "
            "shape [..., T]"
        )
    if (masks[..., 1:] > masks[..., :-1]).any():
        raise ConfigError(
            "masks must be 1 on a prefix of each episode and 0 after it (padding only at the end)"
        )


def gae(rewards: Tensor, values: Tensor, masks: Tensor, gamma: float = 0.99,
        lam: float = 1.0) -> Tensor:
    """A_t = Σ_{j≥t} (γλ)^(j-t) δ_j,  δ_t = r_t + γ V_{t+1} − V_t  (0 on padding).

    With λ = 1 and V = 0 this is the discounted return (see :func:`discounted_returns`).
    """
    _check_masks(rewards, masks)
    if values.shape != rewards.shape:
        raise ConfigError(
            f"values {tuple(values.shape)} must have the shape of rewards {tuple(rewards.shape)}"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ConfigError(f"gamma and lambda must lie in [0, 1], got gamma={gamma}, lambda={lam}")
    values = values * masks
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + gamma * next_values - values) * masks
    return deltas @ _discount_matrix(rewards.shape[-1], gamma * lam, deltas)


def discounted_returns(rewards: Tensor, masks: Tensor, gamma: float = 0.99) -> Tensor:
    """R_t = Σ_{j≥t} γ^(j-t) r_j over the episode's valid steps (0 on padding)."""
    return gae(rewards, torch.zeros_like(rewards), masks, gamma, 1.0)
