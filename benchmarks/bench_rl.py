"""MAML-RL throughput: environment steps per second and seconds per meta-iteration.

    python benchmarks/bench_rl.py [--threads 1] [--iterations 3]

* 2-D navigation sampling (20 tasks × 20 rollouts × H = 100) with the policy in the loop;
* HalfCheetah stepping: metagrad's batched ``mujoco.rollout`` env (with and without the policy),
  gymnasium's ``SyncVectorEnv`` of ``HalfCheetah-v5``, and a Python loop of ``mj_step`` over one
  ``MjData`` per environment;
* seconds per MAML meta-iteration on 2-D navigation at paper scale (sampling included): exact and
  finite-difference Hessian-vector products, the Fisher on a share of the tasks, first order
  (interleaved, median and min).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from metagrad.errors import ConfigError
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.envs import make_env
from metagrad.rl.maml_rl import MAMLRL, RLConfig
from metagrad.rl.sampler import sample_episodes

TASKS, ROLLOUTS = 20, 20


def best_rate(steps: int, run: Callable[[], object], repeats: int = 3) -> float:
    """Steps per second of the fastest of ``repeats`` runs (after one warm-up)."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return steps / best


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def sampling_rate(env_name: str, horizon: int) -> float:
    env = make_env(env_name, horizon=horizon)
    generator = torch.Generator().manual_seed(0)
    env.reset_task(env.sample_tasks(TASKS, generator))
    policy = GaussianMLPPolicy(env.obs_dim, env.act_dim)
    params = {n: p.detach() for n, p in policy.named_parameters()}
    steps = TASKS * ROLLOUTS * horizon
    return best_rate(steps, lambda: sample_episodes(policy, params, env, ROLLOUTS, generator))


def cheetah_env_rate(horizon: int) -> float:
    """metagrad's batched env alone (random actions, no policy)."""
    env = make_env("HalfCheetahVel", horizon=horizon)
    generator = torch.Generator().manual_seed(0)
    env.reset_task(env.sample_tasks(TASKS, generator))

    def run() -> None:
        env.reset(ROLLOUTS, generator)
        for _ in range(horizon):
            env.step(torch.rand(TASKS, ROLLOUTS, env.act_dim, generator=generator) * 2 - 1)

    return best_rate(TASKS * ROLLOUTS * horizon, run)


def gymnasium_vector_rate(horizon: int) -> float | str:
    try:
        import gymnasium as gym

        envs = gym.vector.SyncVectorEnv(
            [lambda: gym.make("HalfCheetah-v5") for _ in range(TASKS * ROLLOUTS)]
        )
    except Exception as error:  # gymnasium's MuJoCo envs need extra packages (imageio)
        return f"unavailable ({type(error).__name__}: {error})"
    rng = np.random.default_rng(0)
    envs.reset(seed=0)
    actions = rng.uniform(-1, 1, (horizon, TASKS * ROLLOUTS, 6)).astype(np.float32)

    def run() -> None:
        for t in range(horizon):
            envs.step(actions[t])

    rate = best_rate(TASKS * ROLLOUTS * horizon, run, repeats=1)
    envs.close()
    return rate


def mj_step_loop_rate(horizon: int) -> float:
    """One MjData per environment, a Python loop over them at every step."""
    import importlib.resources

    import mujoco

    assets = importlib.resources.files("gymnasium") / "envs" / "mujoco" / "assets"
    model = mujoco.MjModel.from_xml_path(str(assets / "half_cheetah.xml"))
    datas = [mujoco.MjData(model) for _ in range(TASKS * ROLLOUTS)]
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (horizon, len(datas), model.nu))

    def run() -> None:
        for t in range(horizon):
            for d, a in zip(datas, actions[t], strict=True):
                d.ctrl[:] = a
                mujoco.mj_step(model, d, nstep=5)

    return best_rate(TASKS * ROLLOUTS * horizon, run, repeats=1)


META_ITERATION_SETTINGS: dict[str, dict[str, object]] = {
    "second order, exact HVP, all tasks (paper)": {"fvp_fraction": 1.0},
    "second order, exact HVP, Fisher on 25% of tasks": {"fvp_fraction": 0.25},
    "second order, finite-difference HVP, all tasks": {"fvp_fraction": 1.0,
                                                       "hvp": "finite_difference"},
    "first order, all tasks": {"fvp_fraction": 1.0, "first_order": True},
    "first order, Fisher on 25% of tasks": {"fvp_fraction": 0.25, "first_order": True},
}


def meta_iteration_seconds(rounds: int) -> dict[str, list[float]]:
    """Seconds per meta-iteration (sampling included) of each setting, interleaved round-robin
    after one warm-up iteration each."""
    trainers = {label: MAMLRL(RLConfig(env="navigation2d", meta_batch=TASKS, rollouts=ROLLOUTS,
                                       **settings))
                for label, settings in META_ITERATION_SETTINGS.items()}
    for trainer in trainers.values():
        trainer.meta_step()
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(rounds):
        for label, trainer in trainers.items():
            times[label].append(trainer.meta_step()["seconds"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5,
                        help="timed meta-iterations per setting (interleaved)")
    parser.add_argument("--cheetah-horizon", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {TASKS} tasks x {ROLLOUTS} "
          "rollouts")
    print(f"navigation2d sampling (policy in loop): {sampling_rate('navigation2d', 100):,.0f} "
          "steps/s")
    h = args.cheetah_horizon
    try:
        print(f"HalfCheetah mujoco.rollout env + policy: {sampling_rate('HalfCheetahVel', h):,.0f}"
              " steps/s")
        print(f"HalfCheetah mujoco.rollout env alone:    {cheetah_env_rate(h):,.0f} steps/s")
        print(f"HalfCheetah python loop of mj_step:      {mj_step_loop_rate(h):,.0f} steps/s")
        rate = gymnasium_vector_rate(h)
        shown = f"{rate:,.0f} steps/s" if isinstance(rate, float) else rate
        print(f"HalfCheetah-v5 gymnasium SyncVectorEnv:  {shown}")
    except ConfigError as error:
        print(f"HalfCheetah: skipped ({error})")
    times = meta_iteration_seconds(args.iterations)
    reference = statistics.median(next(iter(times.values())))
    for label, seconds in times.items():
        median = statistics.median(seconds)
        print(f"navigation2d meta-iteration ({label}): median {median:.2f} s, min "
              f"{min(seconds):.2f} s, {reference / median:.1f}x the paper setting")

if __name__ == "__main__":
    main()
