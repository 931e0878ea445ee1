"""MAML for reinforcement learning (Finn, Abbeel & Levine 2017, §5.3 and App. A.2).

For each task T_i of a meta-batch:

1. sample episodes D_i with π_θ; advantages A from GAE on a linear baseline fitted to D_i;
2. adapt with one policy-gradient step (Eq. 1):  θ'_i = θ − α ∇_θ L_i(θ),
   L_i(θ) = −Σ_t log π_θ(a_t|s_t) A_t / Σ_t 1   (REINFORCE);
3. sample episodes D'_i with π_θ'_i and their advantages A'.

The meta-update is TRPO on θ (Eq. 3 with the TRPO objective of Schulman et al. 2015):

    min_θ  −1/n Σ_i E_{D'_i}[ π_θ'_i(θ)(a|s) / π_θ'_i,old(a|s) · A' ]
    s.t.   1/n Σ_i E_{D'_i}[ KL(π_θ'_i,old ‖ π_θ'_i(θ)) ] ≤ δ,

both terms differentiated through the adaptation step (second order) unless ``first_order``.

``method="pretrain"`` is the paper's "pretrained" baseline: the same TRPO update on the
unadapted policy (no inner step), i.e. one policy trained on all tasks. A freshly constructed
trainer, evaluated without training, is the "random initialisation" baseline.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import UnionType
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from metagrad.core.functional import Params
from metagrad.core.inner_loop import inner_loop
from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError, ConfigError
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.envs import BatchedEnv, canonical_env_name, make_env
from metagrad.rl.returns import discounted_returns, gae
from metagrad.rl.sampler import Episodes, action_distribution, sample_episodes
from metagrad.rl.trpo import HVPMode, trpo_step


@dataclass(frozen=True)
class RLConfig:
    """Settings of MAML-RL; the defaults are the paper's 2-D navigation ones."""

    env: str = "navigation2d"
    method: Literal["maml", "pretrain"] = "maml"
    meta_batch: int = 20
    """Tasks per meta-iteration (paper: 20 for 2-D navigation, 40 for locomotion)."""
    rollouts: int = 20
    """Episodes per task, both before and after adaptation (paper: 20)."""
    horizon: int | None = None
    """Episode length; None = the environment's (100 navigation, 200 locomotion)."""
    inner_lr: float = 0.1
    """α of the adaptation step (training, and the first step at evaluation)."""
    eval_inner_lr: float = 0.05
    """α of the second and later adaptation steps at evaluation (App. A.2)."""
    first_order: bool = False
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_steps: int = 15
    ls_backtrack: float = 0.8
    gamma: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True
    """Centre and scale the advantages per task (the authors' code, ``center_adv``)."""
    hidden: tuple[int, ...] = (100, 100)
    seed: int = 0
    hvp: HVPMode = "exact"
    """Hessian-of-KL products: double backward (``exact``) or ``finite_difference``."""
    fvp_fraction: float = 0.25
    """Share of the meta-batch's tasks (drawn afresh each iteration) on which the KL's Hessian,
    the trust-region metric, is computed: the subsampled Fisher-vector products of TRPO
    (Schulman et al. 2015, App. C.1). The gradient and the line search's KL check always use
    every task. 1.0 = all tasks, as the authors' code; 0.25 measured 2.9× faster per
    meta-iteration on 2-D navigation with the same learning per iteration (README)."""
    nav_normalized_actions: bool = True
    """2-D navigation: the policy acts in units of the action bound, the move being
    clip(0.1·a, ±0.1) (rllab's ``normalize`` wrapper, as in the authors' code), rather than
    clip(a, ±0.1)."""
    nav_reward: Literal["distance", "squared_distance"] = "distance"
    """2-D navigation reward: −‖x − g‖ (the authors' ``point_env_randgoal.py``; the paper's returns,
    −40.4 before and −11.7 after one step, are on this scale) or −‖x − g‖² (the paper's text)."""
    # run (metagrad.training.rl)
    iterations: int = 500
    """Meta-iterations (paper: up to 500)."""
    eval_tasks: int = 40
    eval_rollouts: int = 40
    """Episodes per test task and adaptation step at evaluation."""
    eval_steps: int = 3
    val_every: int = 10
    """Every ``val_every`` meta-iterations the policy is validated: its return averaged over
    1..``eval_steps`` adaptation steps (α as at evaluation) and over ``val_tasks`` tasks drawn
    from a fixed validation seed, ``rollouts`` episodes per task and step. The best validated policy
    is kept as ``checkpoints/best`` (``metagrad eval --checkpoint best``)."""
    val_tasks: int = 20
    baseline: bool = True
    """Also train the "pretrained on all tasks" policy (``method="pretrain"``) on the same task
    batches."""
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    log_every: int = 1
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    env_threads: int = 0
    """MuJoCo environments: threads of the batched ``mujoco.rollout`` (0 = the calling thread)."""

    def __post_init__(self) -> None:
        canonical_env_name(self.env)
        if self.method not in ("maml", "pretrain"):
            raise ConfigError(f"method must be 'maml' or 'pretrain', got {self.method!r}")
        if self.hvp not in ("exact", "finite_difference"):
            raise ConfigError(f"hvp must be 'exact' or 'finite_difference', got {self.hvp!r}")
        if self.nav_reward not in ("distance", "squared_distance"):
            raise ConfigError(
                f"nav_reward must be 'distance' or 'squared_distance', got {self.nav_reward!r}"
            )
        for name in ("meta_batch", "rollouts", "cg_iters", "ls_steps", "iterations", "eval_tasks",
                     "eval_rollouts", "val_every", "val_tasks", "checkpoint_every",
                     "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("horizon", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be a positive integer or None, got {getattr(self, name)!r}"
                )
        if not isinstance(self.env_threads, int) or self.env_threads < 0:
            raise ConfigError(f"env_threads must be an integer >= 0, got {self.env_threads!r}")
        if self.eval_steps < 0:
            raise ConfigError(f"eval_steps must be >= 0, got {self.eval_steps!r}")
        if not 0 < self.fvp_fraction <= 1:
            raise ConfigError(f"fvp_fraction must lie in (0, 1], got {self.fvp_fraction!r}")
        for name in ("inner_lr", "eval_inner_lr", "max_kl"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.ls_backtrack < 1:
            raise ConfigError(f"ls_backtrack must lie in (0, 1), got {self.ls_backtrack!r}")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping must be >= 0, got {self.cg_damping!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(
                f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}"
            )

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """``value`` (e.g. a YAML value or a command-line string) as the type of field ``name``;
        unknown names get the closest valid one suggested."""
        hints = get_type_hints(cls)
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown RL setting {name!r}.{hint} Valid: {', '.join(hints)}")
        hint = hints[name]
        try:
            return _coerce(value, hint)
        except (KeyError, TypeError, ValueError):
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLConfig:
        """A config from plain values (YAML, command-line strings); unknown keys are an error."""
        return cls(**{k: cls.coerce(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for YAML and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, Literal, tuple[int, ...], X | None);
    KeyError, TypeError or ValueError when it is not one."""
    args = get_args(hint)
    if isinstance(hint, UnionType):
        empty = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if empty and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if value is None:
        raise ValueError("empty")
    if get_origin(hint) is Literal:
        if str(value) not in args:
            raise ValueError(value)
        return str(value)
    if get_origin(hint) is tuple:
        if isinstance(value, str):
            value = value.strip("()[] ").replace(",", " ").split()
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        return {"true": True, "false": False}[str(value).lower()]
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if hint is float:
        return float(value)
    return str(value)


@dataclass(frozen=True)
class TaskData:
    """Episodes of a task batch with their advantages ``[tasks, rollouts, T]``."""

    episodes: Episodes
    advantages: Tensor


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


@dataclass(frozen=True)
class OldPolicy:
    """π_θ'_i,old on the post-update episodes (detached): log-probabilities, means, stds."""

    log_prob: Tensor
    loc: Tensor
    scale: Tensor


def meta_objective(policy: GaussianMLPPolicy, params: Params, pre: TaskData, post: TaskData,
                   old: OldPolicy, *, lr: float, inner_steps: int, first_order: bool,
                   tasks: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """(TRPO surrogate loss, mean KL) of θ, through the adaptation on ``pre`` (module doc),
    averaged over ``tasks`` (indices; default all).

    A loop over tasks: its Hessian-vector products measured 1.4× faster than under ``vmap``
    (the per-task tensors stay in cache).
    """
    ep = post.episodes
    losses, kls = [], []
    for i in range(len(post.advantages)) if tasks is None else tasks:
        adapted = inner_loop(_task_loss(policy, pre, i), params, steps=inner_steps, lr=lr,
                             first_order=first_order)
        dist = policy.distribution(ep.obs[i], adapted)
        ratio = torch.exp(dist.log_prob(ep.actions[i]).sum(-1) - old.log_prob[i])
        kl = kl_divergence(Normal(old.loc[i], old.scale[i]), dist).sum(-1)
        losses.append(-_masked_mean(ratio * post.advantages[i], ep.masks[i]))
        kls.append(_masked_mean(kl, ep.masks[i]))
    return torch.stack(losses).mean(), torch.stack(kls).mean()


class MAMLRL:
    """The MAML-RL trainer: :meth:`meta_step` per meta-iteration, :meth:`evaluate` for the
    return after 0, 1, … adaptation steps; :meth:`state_dict` for checkpoints."""

    def __init__(self, config: RLConfig, env: BatchedEnv | None = None,
                 distributed: Distributed | None = None) -> None:
        self.config = config
        self.dist = distributed or Distributed()
        kwargs: dict[str, Any] = {} if config.horizon is None else {"horizon": config.horizon}
        if canonical_env_name(config.env) == "navigation2d":
            kwargs["squared_distance"] = config.nav_reward == "squared_distance"
            kwargs["normalized_actions"] = config.nav_normalized_actions
        elif config.env_threads:
            kwargs["nthread"] = config.env_threads
        self.env = env if env is not None else make_env(config.env, **kwargs)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(config.seed)
            self.policy = GaussianMLPPolicy(self.env.obs_dim, self.env.act_dim, config.hidden)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.baseline = LinearFeatureBaseline()
        self.iteration = 0

    def params(self) -> Params:
        return dict(self.policy.named_parameters())

    def sample_tasks(self, n: int | None = None) -> Tensor:
        """``n`` (default meta_batch) tasks from the training generator."""
        return self.env.sample_tasks(n or self.config.meta_batch, self.generator)

    def _collect(self, params: Params, rollouts: int, generator: torch.Generator,
                 per_task: bool) -> TaskData:
        c = self.config
        episodes = sample_episodes(self.policy, params, self.env, rollouts, generator,
                                   per_task=per_task)
        adv = compute_advantages(episodes, c.gamma, c.gae_lambda, c.normalize_advantages,
                                 self.baseline)
        return TaskData(episodes, adv)

    def meta_step(self, tasks: Tensor | None = None) -> dict[str, float]:
        """One meta-iteration on ``tasks`` (default: a fresh meta-batch); returns metrics.

        Under ``torch.distributed`` every process draws the same tasks and runs its share
        (:meth:`~metagrad.distributed.Distributed.part`) with episode noise of its own; the TRPO
        step combines the shares (:func:`~metagrad.rl.trpo.trpo_step`'s ``reduce``), so every
        process takes the same step.
        """
        c = self.config
        start = time.perf_counter()
        tasks = self.sample_tasks() if tasks is None else tasks
        mine = self.dist.part(len(tasks))
        share = (mine.stop - mine.start) / len(tasks)

        def reduce(t: Tensor) -> Tensor:
            return self.dist.reduce(t, share)

        # this process's episode noise: seeded from the shared stream, so resumable
        seed = int(torch.randint(2**62, (), generator=self.generator))
        generator = torch.Generator().manual_seed(seed + self.dist.rank)
        self.env.reset_task(tasks[mine])
        params = self.params()
        detached = {n: p.detach() for n, p in params.items()}
        pre = self._collect(detached, c.rollouts, generator, per_task=False)
        inner_steps = 1 if c.method == "maml" else 0
        if inner_steps:
            adapted = adapt(self.policy, detached, pre, lr=c.inner_lr, first_order=True)
            post = self._collect(adapted, c.rollouts, generator, per_task=True)
        else:
            adapted = {n: p.expand(len(pre.advantages), *p.shape) for n, p in detached.items()}
            post = pre
        sample_time = time.perf_counter() - start
        with torch.no_grad():
            loc, scale = action_distribution(self.policy, adapted, post.episodes.obs, True)
            log_prob = Normal(loc, scale).log_prob(post.episodes.actions).sum(-1)
        old = OldPolicy(log_prob, loc, scale)

        def objective(p: Params, subset: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
            return meta_objective(self.policy, p, pre, post, old, lr=c.inner_lr,
                                  inner_steps=inner_steps, first_order=c.first_order, tasks=subset)

        curvature = None
        if c.fvp_fraction < 1:
            local = len(pre.advantages)
            subset = torch.randperm(local, generator=generator)[
                :max(1, round(c.fvp_fraction * local))].tolist()
            curvature = lambda p: objective(p, subset)[1]  # noqa: E731
        result = trpo_step(objective, params, max_kl=c.max_kl, cg_iters=c.cg_iters,
                           cg_damping=c.cg_damping, ls_steps=c.ls_steps,
                           ls_backtrack=c.ls_backtrack, hvp=c.hvp, curvature=curvature,
                           reduce=reduce)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(result.params[name])
        self.iteration += 1
        returns = reduce(torch.stack([pre.episodes.returns().mean(),
                                      post.episodes.returns().mean()]))
        return {
            "iteration": float(self.iteration),
            "pre_return": float(returns[0]),
            "post_return": float(returns[1]),
            "surrogate_before": result.loss_before,
            "surrogate_after": result.loss_after,
            "kl": result.kl,
            "step_fraction": result.step_fraction,
            "sample_seconds": sample_time,
            "seconds": time.perf_counter() - start,
        }

    def evaluate(self, tasks: Tensor | None = None, steps: int = 3, rollouts: int = 40,
                 seed: int | None = None) -> list[float]:
        """Mean return after 0, 1, …, ``steps`` adaptation steps: :meth:`task_returns` averaged
        over tasks. ``seed`` defaults to config.seed + 1; ``tasks`` to ``meta_batch`` tasks drawn
        from that seed (the training stream is not disturbed)."""
        c = self.config
        seed = c.seed + 1 if seed is None else seed
        if tasks is None:
            tasks = self.env.sample_tasks(c.meta_batch, torch.Generator().manual_seed(seed))
        return self.task_returns(tasks, steps, rollouts, seed).mean(0).tolist()

    def task_returns(self, tasks: Tensor, steps: int, rollouts: int, seed: int) -> Tensor:
        """``[tasks, steps + 1]``: each task's mean return after 0, 1, …, ``steps`` steps."""
        return torch.stack([ep.returns().mean(1)
                            for ep in self.adaptation(tasks, steps, rollouts, seed)], 1)

    def adaptation(self, tasks: Tensor, steps: int, rollouts: int, seed: int
                   ) -> Iterator[Episodes]:
        """The episodes on ``tasks`` after 0, 1, …, ``steps`` adaptation steps (α = inner_lr
        for the first, eval_inner_lr after; each step adapts on the episodes yielded before it),
        sampled with a generator of its own seeded by ``seed``."""
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        if not isinstance(rollouts, int) or rollouts < 1:
            raise ConfigError(f"rollouts must be a positive integer, got {rollouts!r}")
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        self.env.reset_task(tasks)
        params = {n: p.detach() for n, p in self.params().items()}
        for k in range(steps + 1):
            data = self._collect(params, rollouts, generator, per_task=k > 0)
            yield data.episodes
            if k < steps:
                lr = c.inner_lr if k == 0 else c.eval_inner_lr
                params = adapt(self.policy, params, data, lr=lr, first_order=True,
                               per_task=k > 0)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config, policy weights, generator state, iteration
        (a snapshot: later training does not change it)."""
        return {
            "config": self.config.to_dict(),
            "policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
            "generator": self.generator.get_state(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"config", "policy", "generator", "iteration"} - set(state)
        if missing:
            raise CheckpointError(f"not a MAML-RL checkpoint: missing {sorted(missing)}")
        saved = RLConfig.from_dict(state["config"])
        if (canonical_env_name(saved.env), saved.hidden) != (
                canonical_env_name(self.config.env), self.config.hidden):
            raise CheckpointError(
                f"checkpoint is for env={saved.env!r}, hidden={saved.hidden}; this trainer has "
                f"env={self.config.env!r}, hidden={self.config.hidden}"
            )
        self.policy.load_state_dict(state["policy"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
