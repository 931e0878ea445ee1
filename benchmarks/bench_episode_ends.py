"""Ant sampling when episodes end early: seconds per paper-scale batch, ended environments skipped
against all of them simulated to the horizon.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. .venv/bin/python benchmarks/bench_episode_ends.py \
        [--env AntVel] [--rounds 3] [--run RUN_DIR]

Samples 40 tasks × 20 rollouts × H 200 with ``sample_episodes`` (the policy of RUN_DIR's best
checkpoint, or a fresh GaussianMLPPolicy 100-100) in two interleaved variants: the environment
as it is (an ended episode is no longer simulated), and the same environment with the end rule
switched off, which simulates every environment for all 200 steps, what the physics cost before
ended episodes were skipped. Prints the share of steps in running episodes, each variant's median
seconds per batch and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.envs import make_env
from metagrad.rl.sampler import sample_episodes

TASKS, ROLLOUTS, HORIZON = 40, 20, 200


def policy_parameters(env_name: str, run: Path | None) -> dict[str, torch.Tensor]:
    """The MAML policy of ``run``'s best checkpoint, or a fresh policy's parameters."""
    if run is None:
        env = make_env(env_name, horizon=1)
        policy = GaussianMLPPolicy(env.obs_dim, env.act_dim)
        return {n: p.detach() for n, p in policy.named_parameters()}
    from metagrad.training.checkpoint import CheckpointDir
    from metagrad.training.rl import load_learners, make_learners, rl_config_from_dict
    from metagrad.training.run import RunDirectory

    learners = make_learners(rl_config_from_dict(RunDirectory(run).read_config()))
    load_learners(learners, CheckpointDir(run / "checkpoints").read("best")[1])
    return {n: p.detach() for n, p in learners["maml"].policy.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="AntVel")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = policy_parameters(args.env, args.run)
    env = make_env(args.env, horizon=HORIZON)
    policy = GaussianMLPPolicy(env.obs_dim, env.act_dim)
    env.reset_task(env.sample_tasks(TASKS, torch.Generator().manual_seed(0)))
    never_ends = make_env(args.env, horizon=HORIZON)
    never_ends.reset_task(env.tasks)
    never_ends._unhealthy = lambda: torch.zeros(never_ends._shape, dtype=torch.bool)
    variants = {"ended episodes skipped": env, "every episode simulated to H": never_ends}
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    running = []
    for _ in range(args.rounds):
        for label, variant in variants.items():
            start = time.perf_counter()
            episodes = sample_episodes(policy, params, variant, ROLLOUTS,
                                       torch.Generator().manual_seed(1))
            seconds[label].append(time.perf_counter() - start)
            if variant is env:
                running.append(episodes.masks.mean().item())
    print(f"{args.env}, {'policy of ' + str(args.run) if args.run else 'fresh policy'}: "
          f"{TASKS} tasks x {ROLLOUTS} rollouts x H {HORIZON}; {statistics.mean(running):.0%} of "
          "the steps in running episodes")
    medians = {label: statistics.median(s) for label, s in seconds.items()}
    for label, median in medians.items():
        print(f"  {label}: {median:.1f} s per batch (median of {args.rounds})")
    ratio = medians["every episode simulated to H"] / medians["ended episodes skipped"]
    print(f"  speed-up {ratio:.2f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
