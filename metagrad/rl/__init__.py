"""Meta-reinforcement learning: MAML with a policy-gradient inner loop and a TRPO meta-optimiser
(Finn, Abbeel & Levine 2017, §5.3).

* :mod:`~metagrad.rl.settings`: :class:`RLConfig`, the settings of a run;
* :mod:`~metagrad.rl.envs`: batched environments by name or import path (``ENVS``,
  ``make_env``), the gymnasium adapter;
* :mod:`~metagrad.rl.sampler`: batched episodes; :mod:`~metagrad.rl.returns`,
  :mod:`~metagrad.rl.baselines`: returns, GAE and the linear baseline;
* :mod:`~metagrad.rl.objectives`: the adaptation loss, K-step adaptation and meta-objective;
* :mod:`~metagrad.rl.trpo`: the meta-optimiser; :mod:`~metagrad.rl.maml_rl`: the learner
  :class:`MAMLRL`.
"""

from metagrad.rl.maml_rl import MAMLRL
from metagrad.rl.settings import RLConfig

__all__ = ["MAMLRL", "RLConfig"]
