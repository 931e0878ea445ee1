"""The losses of MAML-RL (Finn, Abbeel & Levine 2017, §5.3): the REINFORCE adaptation loss, the
advantages it weighs, the K-step adaptation (Eq. 1) and the TRPO meta-objective (Eq. 3).

With episodes D_k sampled by π_θ'_k (θ'_0 = θ) and advantages A_k from GAE on a linear baseline,

    θ'_{k+1} = θ'_k − α ∇ L(θ'_k; D_k),   L(θ; D) = −Σ_t log π_θ(a_t|s_t) A_t m_t / Σ_t m_t,

and on the episodes D' sampled by π_θ'_K, with π_old the (detached) policy that sampled them,

    min_θ  −1/n Σ_i E_{D'_i}[ π_θ'_K,i(θ)(a|s) / π_old(a|s) · A' ]
    s.t.   1/n Σ_i E_{D'_i}[ KL(π_old ‖ π_θ'_K,i(θ)) ] ≤ δ,

θ'_K,i(θ) differentiated through all K steps (second order) unless ``first_order``; the
dependence of the episodes D_k on θ is not differentiated (as in the authors' code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from metagrad.core.functional import Params
from metagrad.core.inner_loop import inner_loop
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.returns import discounted_returns, gae
from metagrad.rl.sampler import Episodes
from metagrad.rl.trpo import ComposedKL


@dataclass(frozen=True)
class TaskData:
    """Episodes of a task batch with their advantages ``[tasks, rollouts, T]``."""

    episodes: Episodes
    advantages: Tensor


@dataclass(frozen=True)
class OldPolicy:
    """π_old on the post-update episodes (detached): log-probabilities, means, stds."""

    log_prob: Tensor
    loc: Tensor
    scale: Tensor


def _masked_mean(x: Tensor, masks: Tensor) -> Tensor:
    return (x * masks).sum() / masks.sum().clamp(min=1.0)


def compute_advantages(episodes: Episodes, gamma: float, lam: float, normalize: bool,
                       baseline: LinearFeatureBaseline | None = None) -> Tensor:
    """GAE(γ, λ) on the linear baseline fitted per task; optionally normalised per task over the
    valid steps."""
    baseline = baseline or LinearFeatureBaseline()
    returns = discounted_returns(episodes.rewards, episodes.masks, gamma)
    values = baseline.values(episodes.obs, returns, episodes.masks)
    adv = gae(episodes.rewards, values, episodes.masks, gamma, lam)
    if not normalize:
        return adv
    m = episodes.masks
    count = m.sum((1, 2), keepdim=True).clamp(min=1.0)
    mean = (adv * m).sum((1, 2), keepdim=True) / count
    std = (((adv - mean) * m).square().sum((1, 2), keepdim=True) / count).sqrt()
    return (adv - mean) / (std + 1e-8) * m


def reinforce_loss(policy: GaussianMLPPolicy, params: Params, obs: Tensor, actions: Tensor,
                   advantages: Tensor, masks: Tensor) -> Tensor:
    """L(θ) = −Σ log π_θ(a|s)·A·m / Σ m: the inner (adaptation) loss of one task."""
    return -_masked_mean(policy.log_prob(obs, actions, params) * advantages, masks)


def _task_loss(policy: GaussianMLPPolicy, data: TaskData, i: int) -> Callable[[Params], Tensor]:
    ep = data.episodes
    return lambda p: reinforce_loss(policy, p, ep.obs[i], ep.actions[i], data.advantages[i],
                                    ep.masks[i])


def adapt(policy: GaussianMLPPolicy, params: Params, data: TaskData, *, lr: float,
          steps: int = 1, first_order: bool = False, per_task: bool = False) -> Params:
    """θ'_i for every task of ``data`` (Eq. 1): a dict of tensors with a leading task dimension.

    ``per_task``: ``params`` already has a task dimension (e.g. after an earlier step).
    """
    adapted = [
        inner_loop(_task_loss(policy, data, i),
                   {n: p[i] for n, p in params.items()} if per_task else params,
                   steps=steps, lr=lr, first_order=first_order)
        for i in range(len(data.advantages))
    ]
    return {n: torch.stack([a[n] for a in adapted]) for n in adapted[0]}


PolicyOutputs = Callable[[Params, Sequence[int] | None], tuple[Tensor, Tensor]]
"""``(params, tasks) -> (loc, scale)``: π_θ's action distribution on the sampled steps of the
tasks at indices ``tasks`` (all when ``None``), ``[len(tasks), rollouts, T, act_dim]`` each."""


@dataclass(frozen=True)
class TRPOObjective:
    """The TRPO meta-objective on sampled data (Eq. 3; RL²'s on whole trials), computed from
    π_θ's action distribution on the data (``distribution``):

        (−1/n Σ_i E_{D_i}[ π_θ(a|s) / π_old(a|s) · A ],  1/n Σ_i E_{D_i}[ KL(π_old ‖ π_θ) ])

    each expectation a masked mean over a task's episodes and steps, n the number of tasks
    averaged over. ``objective(params, tasks=None)`` returns that pair over the tasks at indices
    ``tasks`` (default all); :meth:`kl` the KL alone as a :class:`~metagrad.rl.trpo.ComposedKL`,
    so that TRPO can form Gauss–Newton Fisher-vector products."""

    distribution: PolicyOutputs
    data: TaskData
    old: OldPolicy

    def __call__(self, params: Params, tasks: Sequence[int] | None = None
                 ) -> tuple[Tensor, Tensor]:
        loc, scale = self.distribution(params, tasks)
        pick = _pick(tasks)
        log_prob = Normal(loc, scale, validate_args=False).log_prob(
            self.data.episodes.actions[pick]).sum(-1)
        ratio = torch.exp(log_prob - self.old.log_prob[pick])
        surrogate = _task_mean(-ratio * self.data.advantages[pick],
                               self.data.episodes.masks[pick])
        return surrogate, self._divergence((loc, scale), tasks)

    def kl(self, tasks: Sequence[int] | None = None) -> ComposedKL:
        """The mean KL(π_old ‖ π_θ) over the tasks at indices ``tasks`` (default all)."""
        return ComposedKL(functools.partial(self.distribution, tasks=tasks),
                          functools.partial(self._divergence, tasks=tasks))

    def _divergence(self, outputs: tuple[Tensor, ...], tasks: Sequence[int] | None = None
                    ) -> Tensor:
        loc, scale = outputs
        pick = _pick(tasks)
        old = Normal(self.old.loc[pick], self.old.scale[pick], validate_args=False)
        kl = kl_divergence(old, Normal(loc, scale, validate_args=False)).sum(-1)
        return _task_mean(kl, self.data.episodes.masks[pick])


def _pick(tasks: Sequence[int] | None) -> slice | list[int]:
    return slice(None) if tasks is None else list(tasks)


def _task_mean(x: Tensor, masks: Tensor) -> Tensor:
    """The mean over tasks of each task's masked mean over its episodes and steps."""
    return ((x * masks).sum((1, 2)) / masks.sum((1, 2)).clamp(min=1.0)).mean()


def meta_objective(policy: GaussianMLPPolicy, pre: Sequence[TaskData], post: TaskData,
                   old: OldPolicy, *, lr: float, first_order: bool) -> TRPOObjective:
    """MAML-RL's :class:`TRPOObjective` (module doc) of θ on the post-update episodes ``post``
    sampled by ``old``, π_θ'_K,i(θ) adapted per task through K steps.

    ``pre`` holds the K pre-update episode sets D_0, …, D_{K−1}: step k of the adaptation
    θ'_k → θ'_{k+1} descends the REINFORCE loss on ``pre[k]``; K = 0 is the unadapted policy
    (the "pretrained" baseline).
    """
    obs = post.episodes.obs

    def adapted_distribution(params: Params, tasks: Sequence[int] | None = None
                             ) -> tuple[Tensor, Tensor]:
        locs, scales = [], []
        for i in range(len(obs)) if tasks is None else tasks:
            def step_loss(p: Params, step: int, i: int = i) -> Tensor:
                return _task_loss(policy, pre[step], i)(p)

            adapted = inner_loop(step_loss, params, steps=len(pre), lr=lr,
                                 first_order=first_order, step_aware=True)
            dist = policy.distribution(obs[i], adapted)
            locs.append(dist.loc)
            scales.append(dist.scale)
        return torch.stack(locs), torch.stack(scales)

    return TRPOObjective(adapted_distribution, post, old)
