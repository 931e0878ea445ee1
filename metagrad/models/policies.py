"""Gaussian policies of the meta-RL experiments.

:class:`GaussianMLPPolicy`, of MAML (Finn et al. 2017, §5.3): two hidden layers of 100 ReLU units
give the mean; the log standard deviation is one learned vector, independent of the state.

:class:`GaussianGRUPolicy`, of RL² (Duan et al. 2016): a GRU reads (observation, previous action,
previous reward, previous done flag) and its hidden state gives the mean; the log standard
deviation is again one learned vector.

Both are ordinary torch modules whose ``forward`` returns the action distribution, so other
parameters (adapted ones, TRPO's candidates) are used with :func:`torch.func.functional_call`
(or ``distribution``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TypeAlias

import torch
from torch import Tensor, nn
from torch.distributions import Normal
from torch.func import functional_call

from metagrad.errors import ConfigError

RecurrentState: TypeAlias = tuple[Tensor, ...]
"""The hidden state of every GRU layer of :class:`GaussianGRUPolicy`, each ``[*batch, width]``."""


def _log_std(act_dim: int, init_std: float) -> nn.Parameter:
    if not init_std > 0:
        raise ConfigError(f"init_std must be > 0, got {init_std!r}")
    return nn.Parameter(torch.full((act_dim,), float(torch.tensor(init_std).log())))


def _check_sizes(obs_dim: int, act_dim: int) -> None:
    if obs_dim < 1 or act_dim < 1:
        raise ConfigError(
            f"policy sizes must be positive, got obs_dim={obs_dim}, act_dim={act_dim}"
        )


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
        _check_sizes(obs_dim, act_dim)
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, act_dim))
        self.mean = nn.Sequential(*layers)
        self.log_std = _log_std(act_dim, init_std)
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


class GaussianGRUPolicy(nn.Module):
    """π(a_t | x_1..x_t) = N(W·h_t + b, diag(exp(log_std))²), h_t = GRU(x_t, h_{t−1}) (stacked
    layers), x_t = [o_t, a_{t−1}, r_{t−1}, d_{t−1}] (:meth:`inputs`): the recurrent policy of RL²
    (Duan et al. 2016, §2.2 and Fig. 1), whose hidden state is what adapts to the task.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: widths of the stacked GRU layers.
        init_std: initial standard deviation of every action dimension.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100,),
                 init_std: float = 1.0) -> None:
        super().__init__()
        _check_sizes(obs_dim, act_dim)
        if not hidden or min(hidden) < 1:
            raise ConfigError(f"hidden must list positive GRU widths, got {tuple(hidden)}")
        self.input_dim = obs_dim + act_dim + 2
        widths = [self.input_dim, *hidden]
        self.layers = nn.ModuleList(nn.GRU(w_in, w, batch_first=True)
                                    for w_in, w in pairwise(widths))
        self.head = nn.Linear(widths[-1], act_dim)
        self.log_std = _log_std(act_dim, init_std)
        self.obs_dim = obs_dim
        self.act_dim = act_dim

    @staticmethod
    def inputs(obs: Tensor, prev_actions: Tensor, prev_rewards: Tensor,
               prev_dones: Tensor) -> Tensor:
        """x = [o, a_prev, r_prev, d_prev] ``[..., obs_dim + act_dim + 2]`` from ``obs``
        ``[..., obs_dim]``, ``prev_actions`` ``[..., act_dim]`` and the rest ``[...]``."""
        return torch.cat([obs, prev_actions, prev_rewards[..., None],
                          prev_dones[..., None].to(obs.dtype)], -1)

    def initial_state(self, batch_shape: Sequence[int], like: Tensor) -> RecurrentState:
        """The reset hidden state: zeros ``[*batch_shape, width]`` per layer, of ``like``'s dtype
        and device."""
        return tuple(like.new_zeros(*batch_shape, layer.hidden_size) for layer in self.layers)

    def forward(self, inputs: Tensor, state: RecurrentState | None = None
                ) -> tuple[Normal, RecurrentState]:
        """The action distributions for sequences ``inputs`` ``[*batch, T, input_dim]`` from
        ``state`` (default: the reset state), and the state after the last step."""
        batch, steps = inputs.shape[:-2], inputs.shape[-2]
        x = inputs.reshape(-1, steps, self.input_dim)
        if state is None:
            state = self.initial_state(batch, inputs)
        final = []
        for layer, h in zip(self.layers, state, strict=True):
            x, h_last = layer(x, h.reshape(1, -1, layer.hidden_size))
            final.append(h_last.reshape(*batch, layer.hidden_size))
        loc = self.head(x).reshape(*batch, steps, self.act_dim)
        return Normal(loc, self.log_std.exp().expand_as(loc), validate_args=False), tuple(final)

    def distribution(self, inputs: Tensor, params: Mapping[str, Tensor] | None = None,
                     state: RecurrentState | None = None) -> tuple[Normal, RecurrentState]:
        """:meth:`forward` with ``params`` (default: the module's own)."""
        if params is None:
            return self(inputs, state)
        return functional_call(self, dict(params), (inputs, state))
