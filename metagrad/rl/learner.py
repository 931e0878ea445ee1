"""What every meta-RL learner shares (:class:`PolicyLearner`): its environment, a seeded policy
on a device, the training generator, evaluation from :meth:`PolicyLearner.adaptation`, and
checkpoint state. MAML-RL (:mod:`metagrad.rl.maml_rl`) and RL² (:mod:`metagrad.rl.rl2`) differ
in the policy, in how a task's episodes follow each other, and in the meta-step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metagrad.core.functional import Params
from metagrad.distributed import Distributed, resolve_device
from metagrad.errors import CheckpointError
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.envs import BatchedEnv, env_from_config, same_env
from metagrad.rl.sampler import Episodes
from metagrad.rl.settings import RLConfig


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU random stream (tasks, episode noise), the same on every device of the policy."""
    return torch.Generator(device="cpu").manual_seed(seed)


class PolicyLearner:
    """A meta-RL learner: ``policy_class(obs_dim, act_dim, config.hidden)`` seeded by
    ``config.seed`` on ``device`` (default: ``config.device``,
    :func:`~metagrad.distributed.resolve_device`), acting in ``env`` (default: the one
    ``config.env`` names, :func:`~metagrad.rl.envs.env_from_config`; otherwise ``config.env`` is
    only a label). Subclasses implement :meth:`meta_step` and :meth:`adaptation`."""

    policy_class: ClassVar[type[nn.Module]]
    checkpoint_kind: ClassVar[str]
    """The learner's name in the error for a checkpoint that is not one of its own."""

    def __init__(self, config: RLConfig, env: BatchedEnv | None = None,
                 distributed: Distributed | None = None,
                 device: torch.device | str | None = None) -> None:
        self.config = config
        self.dist = distributed or Distributed()
        self.device = resolve_device(config.device if device is None else device)
        self.env = env if env is not None else env_from_config(config, self.device)
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
        """One meta-iteration on ``tasks`` (default: a fresh meta-batch); its metrics."""
        raise NotImplementedError

    def adaptation(self, tasks: Tensor, steps: int, rollouts: int, seed: int
                   ) -> Iterator[Episodes]:
        """The episodes on ``tasks`` after 0, 1, …, ``steps`` adaptation steps, ``rollouts`` per
        task, sampled with a generator of their own seeded by ``seed``."""
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
        saved = RLConfig.from_dict(state["config"])
        if not same_env(saved.env, self.config.env) or saved.hidden != self.config.hidden:
            raise CheckpointError(
                f"checkpoint is for env={saved.env!r}, hidden={saved.hidden}; this trainer has "
                f"env={self.config.env!r}, hidden={self.config.hidden}"
            )
        self.policy.load_state_dict(state["policy"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
