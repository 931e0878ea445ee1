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

from collections.abc import Callable, Iterator

import torch
from torch.distributions import Normal

from metagrad.core.functional import Params
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.learner import MetaBatch, PolicyLearner
from metagrad.rl.objectives import (
    OldPolicy,
    TaskData,
    TRPOObjective,
    adapt,
    compute_advantages,
    meta_objective,
    reinforce_loss,
)
from metagrad.rl.sampler import Episodes, action_distribution, sample_episodes
from metagrad.rl.settings import RLConfig

__all__ = ["MAMLRL", "OldPolicy", "RLConfig", "TRPOObjective", "TaskData", "adapt",
           "compute_advantages", "meta_objective", "reinforce_loss"]


class MAMLRL(PolicyLearner):
    """The MAML-RL trainer: :meth:`meta_step` per meta-iteration, :meth:`evaluate` for the
    return after 0, 1, … adaptation steps; :meth:`state_dict` for checkpoints
    (:class:`~metagrad.rl.learner.PolicyLearner`: env, device, seeds). The random streams are CPU
    generators, so a seed gives the same tasks and episode noise on every device.
    """

    policy_class = GaussianMLPPolicy
    checkpoint_kind = "MAML-RL"
    default_hvp = "exact"

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

    def _sample_meta_batch(self, generator: torch.Generator) -> MetaBatch:
        """D_0, …, D_K and D' on the env's tasks (module doc); the objective is
        :func:`~metagrad.rl.objectives.meta_objective` (MAML, through the K steps) or, for
        ``method="pretrain"``, the same on the unadapted policy (K = 0)."""
        c = self.config
        inner_steps = c.inner_steps if c.method == "maml" else 0
        sampled = list(self._sample_adapting(inner_steps, c.rollouts, generator,
                                             lambda k: c.inner_lr))
        pre = [data for _, data in sampled[:-1]]
        adapted, post = sampled[-1]
        with torch.no_grad():
            loc, scale = action_distribution(self.policy, adapted, post.episodes.obs,
                                             per_task=inner_steps > 0)
            log_prob = Normal(loc, scale).log_prob(post.episodes.actions).sum(-1)
        old = OldPolicy(log_prob, loc, scale)
        objective = meta_objective(self.policy, pre, post, old, lr=c.inner_lr,
                                   first_order=c.first_order)
        return MetaBatch(objective, len(post.advantages), sampled[0][1].episodes,
                         post.episodes)

    def _adaptation(self, steps: int, rollouts: int, generator: torch.Generator
                    ) -> Iterator[Episodes]:
        """α = inner_lr for the first ``inner_steps`` steps (those trained through), then
        eval_inner_lr (App. A.2: one step of 0.1, then 0.05); each step adapts on the episodes
        yielded before it."""
        c = self.config
        for _, data in self._sample_adapting(
                steps, rollouts, generator,
                lambda k: c.inner_lr if k < c.inner_steps else c.eval_inner_lr):
            yield data.episodes
