"""Where an Ant velocity policy's torso spends its episodes, before and after one step.

    python results/antvel-maml-no-termination/posture.py RUN_DIR

RUN_DIR is a run directory of ``metagrad train rl --env antvel`` (its best checkpoint is read).
For goal velocities 0, 0.5, …, 3 it samples 10 episodes per goal before and after one adaptation
step and prints each goal's mean return and mean forward velocity qvel[0], the share of steps
with the torso below 0.3 (lying on its back: the torso is a sphere of radius 0.25), and the
share of steps and episodes after the torso first left the healthy range [0.2, 1.0] of the
authors' ant and gymnasium's Ant-v5 (where those episodes would have ended).
"""

import sys
from pathlib import Path

import torch

from metagrad.training.checkpoint import CheckpointDir
from metagrad.training.rl import load_learners, make_learners, rl_config_from_dict
from metagrad.training.run import RunDirectory

torch.set_num_threads(1)
run = Path(sys.argv[1])
cfg = rl_config_from_dict(RunDirectory(run).read_config())
path, state = CheckpointDir(run / "checkpoints").read("best")
learners = make_learners(cfg)
load_learners(learners, state)
print(f"{path.name}, iteration {state['iteration']}")
goals = torch.linspace(0, 3, 7)
for steps, episodes in enumerate(learners["maml"].adaptation(goals, 1, 10, seed=123)):
    height, velocity = episodes.obs[..., 0], episodes.obs[..., 13]  # qpos[2], qvel[0]
    left = ((height < 0.2) | (height > 1.0)).float().cummax(-1).values
    print(f"after {steps} steps: goals {goals.tolist()}")
    print("  return", episodes.returns().mean(1).numpy().round(1))
    print("  forward velocity", velocity.mean((1, 2)).numpy().round(2))
    print(f"  steps lying (torso < 0.3) {(height < 0.3).float().mean():.2f}; after leaving "
          f"[0.2, 1.0]: steps {left.mean():.2f}, episodes {left[..., -1].mean():.2f}")
