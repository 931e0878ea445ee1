"""What every meta-RL learner shares (:class:`PolicyLearner`): its environment, a seeded policy
on a device, the training generator, evaluation from :meth:`PolicyLearner.adaptation`, and
checkpoint state. MAML-RL (:mod:`metagrad.rl.maml_rl`) and RL² (:mod:`metagrad.rl.rl2`) differ
in the policy, in how a task's episodes follow each other, and in the meta-step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metagrad.core.functional import Params
from metagrad.distributed import Distributed, resolve_device
from metagrad.errors import CheckpointError, ConfigError
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.envs import BatchedEnv, env_from_config, same_env
from metagrad.rl.envs.base import check_env
from metagrad.rl.objectives import TRPOObjective
from metagrad.rl.sampler import Episodes
from metagrad.rl.settings import RLConfig
from metagrad.rl.trpo import HVPMode, trpo_step


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU random stream (tasks, episode noise), the same on every device of the policy."""
    return torch.Generator(device="cpu").manual_seed(seed)


@dataclass
class MetaBatch:
    """A meta-iteration's sampled data as :meth:`PolicyLearner.meta_step` needs it: the TRPO
    ``objective``, the number of this process's tasks it averages over, and the episodes whose
    mean returns are reported as ``pre_return`` (``before`` adaptation) and ``post_return``."""

    objective: TRPOObjective
    tasks: int
    before: Episodes
    after: Episodes


class PolicyLearner:
    """A meta-RL learner: ``policy_class(obs_dim, act_dim, config.hidden)`` seeded by
    ``config.seed`` on ``device`` (default: ``config.device``,
    :func:`~metagrad.distributed.resolve_device`), acting in ``env`` (default: the one
    ``config.env`` names, :func:`~metagrad.rl.envs.env_from_config`; otherwise ``config.env`` is
    only a label). Subclasses implement :meth:`meta_step` and :meth:`adaptation`."""

    policy_class: ClassVar[type[nn.Module]]
    checkpoint_kind: ClassVar[str]
    """The learner's name in the error for a checkpoint that is not one of its own."""
    default_hvp: ClassVar[HVPMode]
    """TRPO's Fisher-vector products when the config says ``hvp="auto"``: the faster for this
    learner's policy (BENCHMARKS.md, meta-RL)."""

    def __init__(self, config: RLConfig, env: BatchedEnv | None = None,
                 distributed: Distributed | None = None,
                 device: torch.device | str | None = None) -> None:
        self.config = config
        self.dist = distributed or Distributed()
        self.device = resolve_device(config.device if device is None else device)
        self.env = env if env is not None else env_from_config(config, self.device)
        check_env(self.env)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(config.seed)
            self.policy = self.policy_class(self.env.obs_dim, self.env.act_dim, config.hidden)
        self.policy.to(self.device)
        self.generator = seeded_generator(config.seed)
        self.baseline = LinearFeatureBaseline()
        self.iteration = 0

    def params(self) -> Params:
        return dict(self.policy.named_parameters())

    def sample_tasks(self, n: int | None = None) -> Tensor:
        """``n`` (default meta_batch) tasks from the training generator."""
        return self.env.sample_tasks(n or self.config.meta_batch, self.generator)

    def meta_step(self, tasks: Tensor | None = None) -> dict[str, float]:
        """One meta-iteration on ``tasks`` (default: a fresh meta-batch): the subclass samples
        this process's tasks and builds the objective (:meth:`_sample_meta_batch`), then one TRPO
        step (:func:`~metagrad.rl.trpo.trpo_step`) updates the policy in place. Metrics:
        ``pre_return``/``post_return`` (the returns of :class:`MetaBatch`'s ``before`` and
        ``after`` episodes), ``pre_length``/``post_length`` (their mean number of steps: below
        the horizon when episodes end early), the TRPO step's surrogate and KL,
        ``sample_seconds`` (sampling and the old policy's log-probabilities) and ``seconds``.

        Under ``torch.distributed`` every process draws the same tasks and runs its share
        (:meth:`~metagrad.distributed.Distributed.part`) with episode noise of its own; the TRPO
        step combines the shares (:func:`~metagrad.rl.trpo.trpo_step`'s ``reduce``), so every
        process takes the same step. With ``fvp_fraction`` < 1 the KL's curvature is taken on
        that fraction of this process's tasks.
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
        generator = seeded_generator(seed + self.dist.rank)
        self.env.reset_task(tasks[mine])
        batch = self._sample_meta_batch(generator)
        sample_time = time.perf_counter() - start
        subset = None
        if c.fvp_fraction < 1:
            subset = torch.randperm(batch.tasks, generator=generator, device="cpu")[
                :max(1, round(c.fvp_fraction * batch.tasks))].tolist()
        hvp = self.default_hvp if c.hvp == "auto" else c.hvp
        # the objective's own KL (its graph reused) unless a subset or the composed form is due
        curvature = (batch.objective.kl(subset)
                     if subset is not None or hvp == "gauss_newton" else None)
        params = self.params()
        result = trpo_step(batch.objective, params, max_kl=c.max_kl, cg_iters=c.cg_iters,
                           cg_damping=c.cg_damping, ls_steps=c.ls_steps,
                           ls_backtrack=c.ls_backtrack, hvp=hvp, curvature=curvature,
                           reduce=reduce)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(result.params[name])
        self.iteration += 1
        means = reduce(torch.stack([batch.before.returns().mean(), batch.after.returns().mean(),
                                    batch.before.masks.sum(-1).mean(),
                                    batch.after.masks.sum(-1).mean()]))
        return {
            "iteration": float(self.iteration),
            "pre_return": float(means[0]),
            "post_return": float(means[1]),
            "pre_length": float(means[2]),
            "post_length": float(means[3]),
            "surrogate_before": result.loss_before,
            "surrogate_after": result.loss_after,
            "kl": result.kl,
            "step_fraction": result.step_fraction,
            "sample_seconds": sample_time,
            "seconds": time.perf_counter() - start,
        }

    def _sample_meta_batch(self, generator: torch.Generator) -> MetaBatch:
        """Sample on the env's current tasks (this process's share) with ``generator``'s noise
        and return the TRPO objective over them."""
        raise NotImplementedError

    def adaptation(self, tasks: Tensor, steps: int, rollouts: int, seed: int
                   ) -> Iterator[Episodes]:
        """The episodes on ``tasks`` after 0, 1, …, ``steps`` adaptation steps, ``rollouts`` per
        task, sampled with a generator of their own seeded by ``seed``
        (:meth:`_adaptation`)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        if not isinstance(rollouts, int) or isinstance(rollouts, bool) or rollouts < 1:
            raise ConfigError(f"rollouts must be a positive integer, got {rollouts!r}")
        self.env.reset_task(tasks)
        return self._adaptation(steps, rollouts, seeded_generator(seed))

    def _adaptation(self, steps: int, rollouts: int, generator: torch.Generator
                    ) -> Iterator[Episodes]:
        """:meth:`adaptation` on the env's current tasks, with ``generator``'s noise."""
        raise NotImplementedError

    def task_returns(self, tasks: Tensor, steps: int, rollouts: int, seed: int) -> Tensor:
        """``[tasks, steps + 1]``: each task's mean return after 0, 1, …, ``steps`` steps
        (:meth:`adaptation`)."""
        return torch.stack([ep.returns().mean(1)
                            for ep in self.adaptation(tasks, steps, rollouts, seed)], 1)

    def evaluate(self, tasks: Tensor | None = None, steps: int = 3, rollouts: int = 40,
                 seed: int | None = None) -> list[float]:
        """Mean return after 0, 1, …, ``steps`` steps: :meth:`task_returns` averaged over tasks.
        ``seed`` defaults to config.seed + 1; ``tasks`` to ``meta_batch`` tasks drawn from that
        seed (the training stream is not disturbed)."""
        c = self.config
        seed = c.seed + 1 if seed is None else seed
        if tasks is None:
            tasks = self.env.sample_tasks(c.meta_batch, seeded_generator(seed))
        return self.task_returns(tasks, steps, rollouts, seed).mean(0).tolist()

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
            raise CheckpointError(f"not a {self.checkpoint_kind} checkpoint: missing "
                                  f"{sorted(missing)}")
        self.load_policy(state)
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])

    def load_policy(self, state: dict[str, Any]) -> None:
        """The policy weights of a :meth:`state_dict` (of a policy for the same environment and
        hidden sizes), leaving the sampling state and iteration count as they are."""
        missing = {"config", "policy"} - set(state)
        if missing:
            raise CheckpointError(f"not a {self.checkpoint_kind} checkpoint: missing "
                                  f"{sorted(missing)}")
        saved = RLConfig.from_dict(state["config"])
        if not same_env(saved.env, self.config.env) or saved.hidden != self.config.hidden:
            raise CheckpointError(
                f"checkpoint is for env={saved.env!r}, hidden={saved.hidden}; this trainer has "
                f"env={self.config.env!r}, hidden={self.config.hidden}"
            )
        self.policy.load_state_dict(state["policy"])
