"""MAML-RL throughput: environment steps per second and seconds per meta-iteration.

    python benchmarks/bench_rl.py [--threads 1] [--iterations 3]

* 2-D navigation sampling (20 tasks × 20 rollouts × H = 100) with the policy in the loop;
* HalfCheetah and Ant sampling with the policy in the loop at the paper's locomotion batch (40
  tasks × 20 rollouts; the ant with gymnasium's and with the authors' rllab control period),
  the batched ``mujoco.rollout`` on the calling thread against the default rollout threads
  (interleaved, median), and the share of that time spent in the physics;
* HalfCheetah stepping: metagrad's batched env without the policy, gymnasium's ``SyncVectorEnv``
  of ``HalfCheetah-v5``, and a Python loop of ``mj_step`` over one ``MjData`` per environment;
* seconds per meta-iteration on 2-D navigation at paper scale (sampling included), MAML-RL and
  RL²: exact, Gauss–Newton and finite-difference Fisher/Hessian-vector products, the Fisher on
  a share of the tasks, first order (interleaved, median and min); ``--only maml|rl2`` runs
  just one learner's.
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
from metagrad.rl.envs import BatchedEnv, make_env
from metagrad.rl.envs.locomotion import default_threads
from metagrad.rl.maml_rl import MAMLRL, RLConfig
from metagrad.rl.rl2 import RL2
from metagrad.rl.sampler import sample_episodes

TASKS, ROLLOUTS = 20, 20
LOCOMOTION_TASKS = 40


def best_rate(steps: int, run: Callable[[], object], repeats: int = 3) -> float:
    """Steps per second of the fastest of ``repeats`` runs (after one warm-up)."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return steps / best


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def sampler(env_name: str, horizon: int, tasks: int = TASKS,
            **settings: object) -> tuple[BatchedEnv, Callable[[], object]]:
    """The env and one call of ``sample_episodes`` (GaussianMLPPolicy 100-100) on it, ``tasks`` ×
    ``ROLLOUTS`` episodes."""
    env = make_env(env_name, horizon=horizon, **settings)
    generator = torch.Generator().manual_seed(0)
    env.reset_task(env.sample_tasks(tasks, generator))
    policy = GaussianMLPPolicy(env.obs_dim, env.act_dim)
    params = {n: p.detach() for n, p in policy.named_parameters()}
    return env, lambda: sample_episodes(policy, params, env, ROLLOUTS, generator)


def sampling_rate(env_name: str, horizon: int) -> float:
    return best_rate(TASKS * ROLLOUTS * horizon, sampler(env_name, horizon)[1])


def locomotion_sampling(env_name: str, horizon: int, rounds: int, physics: str) -> None:
    """Prints the sampling rate with the rollout on the calling thread and with the default
    threads (interleaved, median of ``rounds`` after a warm-up each), and the share of the
    calling thread's sampling time spent inside ``mujoco.rollout`` (the physics)."""
    env, on_caller = sampler(env_name, horizon, LOCOMOTION_TASKS, env_threads=0,
                             physics=physics)
    physics_seconds: list[float] = []
    rollout = env._rollout.rollout

    def timed_rollout(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        result = rollout(*args, **kwargs)
        physics_seconds.append(time.perf_counter() - start)
        return result

    env._rollout.rollout = timed_rollout
    variants = {"calling thread": on_caller,
                f"default env_threads ({default_threads()})":
                    sampler(env_name, horizon, LOCOMOTION_TASKS, physics=physics)[1]}
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in variants}
    shares = []
    for _ in range(rounds):
        for label, run in variants.items():
            physics_seconds.clear()
            times[label].append(_timed(run))
            if run is on_caller:
                shares.append(sum(physics_seconds) / times[label][-1])
    steps = LOCOMOTION_TASKS * ROLLOUTS * horizon
    first = statistics.median(times["calling thread"])
    for label, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{env_name} ({physics} physics) + policy, {label}: {steps / median:,.0f} steps/s "
              f"(median of {rounds}), {first / median:.2f}x the calling thread")
    print(f"{env_name} ({physics} physics): mujoco.rollout {statistics.median(shares):.0%} of "
          "the sampling time on the calling thread")


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
    "second order, Gauss-Newton FVP, all tasks": {"fvp_fraction": 1.0, "hvp": "gauss_newton"},
    "second order, Gauss-Newton FVP, Fisher on 25% of tasks": {"fvp_fraction": 0.25,
                                                                "hvp": "gauss_newton"},
    "second order, finite-difference HVP, all tasks": {"fvp_fraction": 1.0,
                                                       "hvp": "finite_difference"},
    "first order, all tasks": {"fvp_fraction": 1.0, "first_order": True},
    "first order, Fisher on 25% of tasks": {"fvp_fraction": 0.25, "first_order": True},
}
RL2_SETTINGS: dict[str, dict[str, object]] = {
    "RL², exact HVP, Fisher on 25% of tasks": {"method": "rl2", "hvp": "exact"},
    "RL², Gauss-Newton FVP, Fisher on 25% of tasks": {"method": "rl2", "hvp": "gauss_newton"},
}


def meta_iteration_seconds(rounds: int, settings_by_label: dict[str, dict[str, object]]
                           ) -> dict[str, list[float]]:
    """Seconds per meta-iteration (sampling included) of each setting, interleaved round-robin
    after one warm-up iteration each."""
    def learner(settings: dict[str, object]) -> MAMLRL | RL2:
        config = RLConfig(env="navigation2d", meta_batch=TASKS, rollouts=ROLLOUTS,
                          **settings)  # type: ignore[arg-type]
        return RL2(config) if config.method == "rl2" else MAMLRL(config)

    trainers = {label: learner(settings) for label, settings in settings_by_label.items()}
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
    parser.add_argument("--locomotion-horizon", type=int, default=50,
                        help="episode length of the locomotion measurements")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the locomotion sampling rates")
    parser.add_argument("--no-meta-iterations", action="store_true",
                        help="only the sampling and stepping rates")
    parser.add_argument("--only", choices=("maml", "rl2"),
                        help="only the meta-iterations of MAML-RL or of RL² (no sampling rates)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {TASKS} tasks x {ROLLOUTS} "
          f"rollouts; load average {os.getloadavg()[0]:.2f}")
    if args.only:
        settings = META_ITERATION_SETTINGS if args.only == "maml" else RL2_SETTINGS
        report_meta_iterations(meta_iteration_seconds(args.iterations, settings))
        return
    print(f"navigation2d sampling (policy in loop): {sampling_rate('navigation2d', 100):,.0f} "
          "steps/s")
    h = args.locomotion_horizon
    try:
        for name, physics in (("HalfCheetahVel", "gymnasium"), ("AntVel", "gymnasium"),
                              ("AntVel", "rllab")):
            locomotion_sampling(name, h, args.rounds, physics)
        print(f"HalfCheetah mujoco.rollout env alone:    {cheetah_env_rate(h):,.0f} steps/s")
        print(f"HalfCheetah python loop of mj_step:      {mj_step_loop_rate(h):,.0f} steps/s")
        rate = gymnasium_vector_rate(h)
        shown = f"{rate:,.0f} steps/s" if isinstance(rate, float) else rate
        print(f"HalfCheetah-v5 gymnasium SyncVectorEnv:  {shown}")
    except ConfigError as error:
        print(f"locomotion: skipped ({error})")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.no_meta_iterations:
        return
    report_meta_iterations(meta_iteration_seconds(args.iterations, {
        **META_ITERATION_SETTINGS, **RL2_SETTINGS}))


def report_meta_iterations(times: dict[str, list[float]]) -> None:
    """Each setting's median and min seconds, and its speed relative to the first setting."""
    reference = statistics.median(next(iter(times.values())))
    for label, seconds in times.items():
        median = statistics.median(seconds)
        print(f"navigation2d meta-iteration ({label}): median {median:.2f} s, min "
              f"{min(seconds):.2f} s, {reference / median:.2f}x the first setting")
    print(f"load average {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
