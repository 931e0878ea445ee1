"""Gaussian MLP policy of the MAML reinforcement-learning experiments (Finn et al. 2017, §5.3):
two hidden layers of 100 ReLU units give the mean; the log standard deviation is one learned
vector, independent of the state.

The policy is an ordinary ``nn.Module`` whose ``forward`` returns the action distribution, so
adapted parameters are used with :func:`torch.func.functional_call` (or :meth:`distribution`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Normal
from torch.func import functional_call

from metagrad.errors import ConfigError


class GaussianMLPPolicy(nn.Module):
    """π(a|s) = N(μ_θ(s), diag(exp(log_std))²), μ_θ an MLP (ReLU hidden layers).

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden layer widths (paper: ``(100, 100)``).
        init_std: initial standard deviation of every action dimension.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100),
                 init_std: float = 1.0) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ConfigError(
                f"policy sizes must be positive, got obs_dim={obs_dim}, act_dim={act_dim}"
            )
        if not init_std > 0:
            raise ConfigError(f"init_std must be > 0, got {init_std!r}")
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, act_dim))
        self.mean = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(torch.tensor(init_std).log())))
        self.obs_dim = obs_dim
        self.act_dim = act_dim

    def forward(self, obs: Tensor) -> Normal:
        """The action distribution (independent dimensions) for observations ``[..., obs_dim]``."""
        loc = self.mean(obs)
        return Normal(loc, self.log_std.exp().expand_as(loc), validate_args=False)

    def distribution(self, obs: Tensor, params: Mapping[str, Tensor] | None = None) -> Normal:
        """π_params(·|obs); ``params`` (e.g. adapted ones) default to the module's own."""
        if params is None:
            return self(obs)
        return functional_call(self, dict(params), (obs,))

    def log_prob(self, obs: Tensor, actions: Tensor,
                 params: Mapping[str, Tensor] | None = None) -> Tensor:
        """log π(a|s), summed over action dimensions: shape ``obs.shape[:-1]``."""
        return self.distribution(obs, params).log_prob(actions).sum(-1)
