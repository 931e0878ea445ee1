"""RL², the black-box meta-RL baseline (Duan et al. 2016, "RL²: Fast Reinforcement Learning via
Slow Reinforcement Learning"; Wang et al. 2016, "Learning to reinforcement learn").

The "fast" learner is the hidden state of a recurrent policy (:class:`GaussianGRUPolicy`): at
every step it reads x_t = [o_t, a_{t−1}, r_{t−1}, d_{t−1}] (d = 1 on the first step of an episode
after the first; a, r, d are 0 on the trial's first step). A *trial* is E consecutive episodes of
one task (E = ``rl2_episodes`` in training) during which the hidden state carries over episode
boundaries; it is reset between trials (and so between tasks). The "slow" learner is ordinary RL
on whole trials, each one long episode of the meta-MDP:

    max_θ  E_{T ~ p(T)} E_{trial ~ π_θ, T} [ Σ_{t over the trial} γ^t r_t ],

here by one TRPO step per meta-iteration (:func:`~metagrad.rl.trpo.trpo_step`, the optimiser of
Duan et al.; MAML-RL's too; its Fisher-vector products in Gauss–Newton form by default, which
avoids differentiating the backward pass through the recurrence) on

    min_θ  −1/n Σ_i E_{trials of T_i}[ π_θ(a_t|x_≤t) / π_old(a_t|x_≤t) · A_t ]
    s.t.   1/n Σ_i E_{trials of T_i}[ KL(π_old(·|x_≤t) ‖ π_θ(·|x_≤t)) ] ≤ δ,

A_t by GAE(γ, λ) over the whole trial (discounting across episode boundaries, the value after
the trial's last step 0), on the linear feature baseline fitted per task
(:func:`~metagrad.rl.objectives.compute_advantages`, as MAML-RL), then normalised per task.

Batching: the environment steps ``[tasks, rollouts]`` episodes at once; here ``rollouts`` are
parallel trials. Each episode of a trial is sampled by MAML-RL's
:func:`~metagrad.rl.sampler.sample_episodes`, with the recurrent policy stepped by a stateful
adapter; an episode that ends early (``done``) freezes its trial's hidden state until the next
episode starts, so a trial is the sequence of its episodes' valid steps
(:func:`whole_trials`), on which the policy is re-evaluated for the objective.

Sample budget: MAML-RL samples ``meta_batch × rollouts`` episodes with each of its K + 1
policies (θ, θ'_1, …, θ'_K; K = ``inner_steps``) per meta-iteration; RL² samples
``meta_batch × rollouts`` trials of E episodes, the same ``meta_batch × rollouts × horizon ×
(1 + inner_steps)`` environment steps when E = K + 1 (the defaults: E = 2, K = 1).

Evaluation: "after k adaptation steps" is the (k+1)-th episode of a trial of ``steps + 1``
episodes (RL²'s adaptation is its hidden state, which has seen k episodes of the task), with
``rollouts`` trials per task, so RL²'s rows line up with MAML's (k gradient steps, each on
``rollouts`` episodes) at the same number of episodes per task.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.distributions import Normal

from metagrad.core.functional import Params
from metagrad.models.policies import GaussianGRUPolicy, RecurrentState
from metagrad.rl.envs import BatchedEnv
from metagrad.rl.learner import MetaBatch, PolicyLearner
from metagrad.rl.objectives import OldPolicy, TaskData, TRPOObjective, compute_advantages
from metagrad.rl.sampler import Episodes, sample_episodes


class _TrialPolicy:
    """The recurrent policy as :func:`sample_episodes` calls it, one step at a time
    (``distribution``), with the memory of the trial so far: the hidden state and the previous
    action, reward and done flag, per task and trial. :class:`_TrialEnv` feeds it every step's
    outcome (``observe``) and every episode start (``start_episode``)."""

    def __init__(self, policy: GaussianGRUPolicy, params: Params) -> None:
        self.policy = policy
        self.like = next(iter(params.values()))
        self.state: RecurrentState | None = None  # None: the trial has not started

    def start_episode(self, obs: Tensor) -> None:
        batch = obs.shape[:-1]
        ones = torch.ones(batch, dtype=torch.bool, device=self.like.device)
        if self.state is None:  # the trial's first episode: the reset state, no previous step
            self.state = self.policy.initial_state(batch, self.like)
            self.prev_actions = self.like.new_zeros(*batch, self.policy.act_dim)
            self.prev_rewards = self.like.new_zeros(batch)
            self.prev_dones = ~ones
        else:  # a later one: the previous step ended the previous episode
            self.prev_dones = ones
        self.alive = ones

    def distribution(self, obs: Tensor, params: Params) -> Normal:
        x = self.policy.inputs(obs, self.prev_actions, self.prev_rewards, self.prev_dones)
        dist, self.next_state = self.policy.distribution(x[..., None, :], params, self.state)
        return Normal(dist.loc[..., 0, :], dist.scale[..., 0, :], validate_args=False)

    def observe(self, actions: Tensor, rewards: Tensor, done: Tensor) -> None:
        """The step taken: trials whose episode had ended keep their memory unchanged."""
        assert self.state is not None
        alive = self.alive
        self.state = tuple(torch.where(alive[..., None], new, old)
                           for new, old in zip(self.next_state, self.state, strict=True))
        self.prev_actions = torch.where(alive[..., None], actions.to(self.like), self.prev_actions)
        self.prev_rewards = torch.where(alive, rewards.to(self.like), self.prev_rewards)
        self.prev_dones = torch.zeros_like(alive)
        self.alive = alive & ~done.to(alive.device)


class _TrialEnv:
    """``env`` as :func:`sample_episodes` sees it during a trial: resets and steps pass through,
    each also reported to the trial's :class:`_TrialPolicy`."""

    def __init__(self, env: BatchedEnv, policy: _TrialPolicy) -> None:
        self.env, self.policy = env, policy
        self.obs_dim, self.act_dim, self.horizon = env.obs_dim, env.act_dim, env.horizon

    def reset(self, rollouts: int, generator: torch.Generator) -> Tensor:
        obs = self.env.reset(rollouts, generator)
        self.policy.start_episode(obs)
        return obs

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        obs, rewards, done = self.env.step(actions)
        self.policy.observe(actions, rewards, done)
        return obs, rewards, done


@torch.no_grad()
def sample_trials(policy: GaussianGRUPolicy, env: BatchedEnv, episodes: int, rollouts: int,
                  generator: torch.Generator) -> list[Episodes]:
    """``rollouts`` trials of ``episodes`` episodes on each of the env's current tasks, actions
    a ~ π_θ(·|x_≤t) with the hidden state reset at each trial's start only; the trials' k-th
    episodes are the k-th element (``[tasks, rollouts, horizon]``, as
    :func:`~metagrad.rl.sampler.sample_episodes` returns them)."""
    params = {n: p.detach() for n, p in policy.named_parameters()}
    trial = _TrialPolicy(policy, params)
    trial_env = _TrialEnv(env, trial)
    # the adapters stand in for the MLP policy and the env (duck-typed: distribution, reset, step)
    return [sample_episodes(trial, params, trial_env, rollouts, generator)  # type: ignore[arg-type]
            for _ in range(episodes)]


def whole_trials(episodes: Sequence[Episodes]) -> tuple[Episodes, Tensor]:
    """The trials as single episodes ``[tasks, rollouts, E·horizon]``: every trial's valid steps
    of its E episodes in order, then padding (mask 0); and the policy's inputs x_t at those steps
    (:meth:`GaussianGRUPolicy.inputs`, d_{t−1} = 1 where step t−1 ended an episode), as the
    sampler fed them."""
    def cat(field: str) -> Tensor:
        return torch.cat([getattr(ep, field) for ep in episodes], 2)

    masks = cat("masks")
    # 1 on every episode's last valid step (masks are 1 on a prefix of each episode)
    ends = torch.cat([ep.masks - torch.nn.functional.pad(ep.masks[..., 1:], (0, 1))
                      for ep in episodes], 2)
    order = torch.argsort((masks == 0).to(torch.int8), dim=-1, stable=True)  # valid steps first

    def take(x: Tensor) -> Tensor:
        index = order if x.dim() == 3 else order[..., None].expand(*order.shape, x.shape[-1])
        return x.gather(2, index)

    def previous(x: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], 2)

    trial = Episodes(take(cat("obs")), take(cat("actions")), take(cat("rewards")), take(masks))
    inputs = GaussianGRUPolicy.inputs(trial.obs, previous(trial.actions), previous(trial.rewards),
                                      previous(take(ends)))
    return trial, inputs


def trial_objective(policy: GaussianGRUPolicy, data: TaskData, inputs: Tensor,
                    old: OldPolicy) -> TRPOObjective:
    """RL²'s :class:`~metagrad.rl.objectives.TRPOObjective` (module doc): ``data`` holds the
    trials (:func:`whole_trials`) and their advantages, ``inputs`` the policy's inputs on them,
    ``old`` the policy that sampled them."""
    def trial_distribution(params: Params, tasks: Sequence[int] | None = None
                           ) -> tuple[Tensor, Tensor]:
        dist, _ = policy.distribution(inputs if tasks is None else inputs[list(tasks)], params)
        return dist.loc, dist.scale

    return TRPOObjective(trial_distribution, data, old)


class RL2(PolicyLearner):
    """The RL² trainer, with the interface of :class:`~metagrad.rl.maml_rl.MAMLRL`:
    :meth:`meta_step` per meta-iteration, :meth:`task_returns`/:meth:`evaluate` for the return of
    the 1st, 2nd, … episode of a trial ("after 0, 1, … steps"), :meth:`state_dict` for
    checkpoints.

    ``config.hidden`` are the widths of the GRU layers; ``config.rl2_episodes`` the episodes per
    training trial (MAML's sample budget when it is ``inner_steps`` + 1, module doc); the
    gradient-adaptation settings (``inner_lr``, ``eval_inner_lr``, ``inner_steps``) only set
    the step sizes that the random-initialisation baseline of an evaluation is validated around,
    and ``first_order`` is refused. ``env`` and ``device`` as for MAMLRL; the random streams are CPU
    generators.
    """

    policy_class = GaussianGRUPolicy
    checkpoint_kind = "RL²"
    default_hvp = "gauss_newton"

    def _sample_meta_batch(self, generator: torch.Generator) -> MetaBatch:
        """``rollouts`` trials of ``rl2_episodes`` episodes per task; the objective is
        :func:`trial_objective` on whole trials. ``pre_return``/``post_return`` are the trials'
        first and last episodes, as MAML-RL's before and after adaptation."""
        c = self.config
        episodes = sample_trials(self.policy, self.env, c.rl2_episodes, c.rollouts, generator)
        trial, inputs = whole_trials(episodes)
        data = TaskData(trial, compute_advantages(trial, c.gamma, c.gae_lambda,
                                                  c.normalize_advantages, self.baseline))
        with torch.no_grad():
            dist, _ = self.policy(inputs)
            old = OldPolicy(dist.log_prob(trial.actions).sum(-1), dist.loc, dist.scale)

        objective = trial_objective(self.policy, data, inputs, old)
        return MetaBatch(objective, len(data.advantages), episodes[0], episodes[-1])

    def _adaptation(self, steps: int, rollouts: int, generator: torch.Generator
                    ) -> Iterator[Episodes]:
        """The 1st, …, (``steps`` + 1)-th episodes of ``rollouts`` trials on each task
        (:func:`sample_trials`)."""
        yield from sample_trials(self.policy, self.env, steps + 1, rollouts, generator)
