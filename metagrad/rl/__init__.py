"""Meta-reinforcement learning: MAML with a policy-gradient inner loop and a TRPO meta-optimiser
(Finn, Abbeel & Levine 2017, §5.3)."""

from metagrad.rl.maml_rl import MAMLRL, RLConfig

__all__ = ["MAMLRL", "RLConfig"]
