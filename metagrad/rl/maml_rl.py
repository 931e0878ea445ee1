"""The MAML-RL learner (Finn, Abbeel & Levine 2017, §5.3 and App. A.2).

Each meta-iteration, for every task T_i of a meta-batch: sample episodes D_0 with π_θ, adapt
θ'_1 = θ − α∇L(θ; D_0) (Eq. 1), sample D_1 with π_θ'_1, … up to θ'_K (K = ``inner_steps``),
then sample D' with π_θ'_K; the meta-update is one TRPO step on θ of the surrogate and KL of
:func:`~metagrad.rl.objectives.meta_objective` (Eq. 3), differentiated through the K steps.

``method="pretrain"`` is the paper's "pretrained" baseline: the same TRPO update on the
unadapted policy (K = 0), i.e. one policy trained on all tasks. A freshly constructed learner,
evaluated without training, is the "random initialisation" baseline.

:class:`~metagrad.rl.settings.RLConfig` and the objectives are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Normal

from metagrad.core.functional import Params
from metagrad.distributed import Distributed, resolve_device
from metagrad.errors import CheckpointError, ConfigError
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.envs import BatchedEnv, env_from_config, same_env
from metagrad.rl.objectives import (
    OldPolicy,
    TaskData,
    adapt,
    compute_advantages,
    meta_objective,
    reinforce_loss,
)
from metagrad.rl.sampler import Episodes, action_distribution, sample_episodes
from metagrad.rl.settings import RLConfig
from metagrad.rl.trpo import trpo_step

__all__ = ["MAMLRL", "OldPolicy", "RLConfig", "TaskData", "adapt", "compute_advantages",
           "meta_objective", "reinforce_loss"]


class MAMLRL:
    """The MAML-RL trainer: :meth:`meta_step` per meta-iteration, :meth:`evaluate` for the
    return after 0, 1, … adaptation steps; :meth:`state_dict` for checkpoints.

    ``env``: any :class:`~metagrad.rl.envs.BatchedEnv`; by default the one ``config.env`` names
    (:func:`~metagrad.rl.envs.env_from_config`), which is otherwise only a label. The policy
    lives on ``device`` (default: ``config.device``, :func:`~metagrad.distributed.resolve_device`);
    the random streams are CPU generators, so a seed gives the same tasks and episode noise on
    every device.
    """

    def __init__(self, config: RLConfig, env: BatchedEnv | None = None,
                 distributed: Distributed | None = None,
                 device: torch.device | str | None = None) -> None:
        self.config = config
        self.dist = distributed or Distributed()
        self.device = resolve_device(config.device if device is None else device)
        self.env = env if env is not None else env_from_config(config, self.device)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(config.seed)
            self.policy = GaussianMLPPolicy(self.env.obs_dim, self.env.act_dim, config.hidden)
        self.policy.to(self.device)
        self.generator = _generator(config.seed)
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

    def _sample_adapting(self, steps: int, rollouts: int, generator: torch.Generator,
                         lr: Callable[[int], float]) -> Iterator[tuple[Params, TaskData]]:
        """(θ'_k, episodes sampled with π_θ'_k) for k = 0, …, ``steps`` on the env's current
        tasks: θ'_0 = θ (detached), θ'_{k+1} one first-order step of α = ``lr(k)`` on the k-th
        episodes, per task (a leading task dimension from k = 1)."""
        params = {n: p.detach() for n, p in self.params().items()}
        for k in range(steps + 1):
            data = self._collect(params, rollouts, generator, per_task=k > 0)
            yield params, data
            if k < steps:
                params = adapt(self.policy, params, data, lr=lr(k), first_order=True,
                               per_task=k > 0)

    def meta_step(self, tasks: Tensor | None = None) -> dict[str, float]:
        """One meta-iteration on ``tasks`` (default: a fresh meta-batch); returns metrics
        (``pre_return``: the unadapted policy's, ``post_return``: after ``inner_steps`` steps).

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
        seed = int(torch.randint(2**62, (), generator=self.generator, device="cpu"))
        generator = _generator(seed + self.dist.rank)
        self.env.reset_task(tasks[mine])
        inner_steps = c.inner_steps if c.method == "maml" else 0
        sampled = list(self._sample_adapting(inner_steps, c.rollouts, generator,
                                             lambda k: c.inner_lr))
        pre = [data for _, data in sampled[:-1]]
        adapted, post = sampled[-1]
        sample_time = time.perf_counter() - start
        with torch.no_grad():
            loc, scale = action_distribution(self.policy, adapted, post.episodes.obs,
                                             per_task=inner_steps > 0)
            log_prob = Normal(loc, scale).log_prob(post.episodes.actions).sum(-1)
        old = OldPolicy(log_prob, loc, scale)

        def objective(p: Params, subset: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
            return meta_objective(self.policy, p, pre, post, old, lr=c.inner_lr,
                                  first_order=c.first_order, tasks=subset)

        curvature = None
        if c.fvp_fraction < 1:
            local = len(post.advantages)
            subset = torch.randperm(local, generator=generator, device="cpu")[
                :max(1, round(c.fvp_fraction * local))].tolist()
            curvature = lambda p: objective(p, subset)[1]  # noqa: E731
        params = self.params()
        result = trpo_step(objective, params, max_kl=c.max_kl, cg_iters=c.cg_iters,
                           cg_damping=c.cg_damping, ls_steps=c.ls_steps,
                           ls_backtrack=c.ls_backtrack, hvp=c.hvp, curvature=curvature,
                           reduce=reduce)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(result.params[name])
        self.iteration += 1
        unadapted = sampled[0][1].episodes
        returns = reduce(torch.stack([unadapted.returns().mean(),
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
            tasks = self.env.sample_tasks(c.meta_batch, _generator(seed))
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
        self.env.reset_task(tasks)
        for _, data in self._sample_adapting(
                steps, rollouts, _generator(seed),
                lambda k: c.inner_lr if k == 0 else c.eval_inner_lr):
            yield data.episodes

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
        if not same_env(saved.env, self.config.env) or saved.hidden != self.config.hidden:
            raise CheckpointError(
                f"checkpoint is for env={saved.env!r}, hidden={saved.hidden}; this trainer has "
                f"env={self.config.env!r}, hidden={self.config.hidden}"
            )
        self.policy.load_state_dict(state["policy"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])


def _generator(seed: int) -> torch.Generator:
    """A CPU random stream (tasks, episode noise), the same on every device of the policy."""
    return torch.Generator(device="cpu").manual_seed(seed)
