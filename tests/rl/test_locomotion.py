"""MuJoCo locomotion tasks (skipped without the optional ``mujoco``)."""

import sys

import numpy as np
import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.rl.envs import make_env

mujoco = pytest.importorskip("mujoco", reason="MuJoCo tasks need: pip install 'metagrad[rl]'")

from metagrad.models.policies import GaussianMLPPolicy  # noqa: E402
from metagrad.rl.envs.locomotion import default_threads  # noqa: E402
from metagrad.rl.maml_rl import MAMLRL, RLConfig  # noqa: E402
from metagrad.rl.sampler import sample_episodes  # noqa: E402


def test_missing_mujoco_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(ConfigError, match=r"metagrad\[rl\]"):
        make_env("HalfCheetahVel")


def test_half_cheetah_vel_reward_and_determinism():
    env = make_env("HalfCheetahVel", horizon=5, env_threads=0)
    assert (env.obs_dim, env.act_dim) == (17, 6)
    env.reset_task(torch.tensor([1.5, 0.0]))
    obs = env.reset(2, torch.Generator().manual_seed(0))
    x0 = env._state[:, 1].copy()
    actions = torch.full((2, 2, 6), 3.0)  # clipped to 1
    obs2, reward, done = env.step(actions)
    velocity = torch.from_numpy((env._state[:, 1] - x0) / env.dt).float().view(2, 2)
    expected = -(velocity - torch.tensor([[1.5], [0.0]])).abs() - 0.05 * 6
    torch.testing.assert_close(reward, expected)
    assert not done.any() and obs2.shape == (2, 2, 17) and not torch.equal(obs, obs2)
    other = make_env("HalfCheetahVel", horizon=5, env_threads=2)  # threads do not change results
    other.reset_task(torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(other.reset(2, torch.Generator().manual_seed(0)), obs)
    torch.testing.assert_close(other.step(actions)[0], obs2)


def test_direction_tasks_and_ant_shapes():
    g = torch.Generator().manual_seed(0)
    cheetah = make_env("HalfCheetahDir")
    assert set(cheetah.sample_tasks(50, g).tolist()) == {-1.0, 1.0}
    ant = make_env("AntVel", horizon=3)
    assert (ant.obs_dim, ant.act_dim) == (27, 8)
    goals = ant.sample_tasks(100, g)
    assert goals.min() >= 0 and goals.max() <= 3 and goals.max() > 2.5


def test_half_cheetah_vel_meta_steps_smoke():
    trainer = MAMLRL(RLConfig(env="HalfCheetahVel", meta_batch=2, rollouts=2, horizon=20,
                              hidden=(16, 16), env_threads=2))
    assert trainer.env._rollout is not None and len(trainer.env._data) == 2
    for _ in range(2):
        metrics = trainer.meta_step()
        assert torch.isfinite(torch.tensor(list(metrics.values()))).all()
    assert len(trainer.evaluate(steps=1, rollouts=2)) == 2


def _reset_in_the_air(env) -> None:
    """Makes ``env.reset`` start every ant at torso height 1.3, above the healthy range."""
    original_reset = env.reset

    def reset(rollouts, generator):
        original_reset(rollouts, generator)
        env._state[:, env._qpos.start + 2] = 1.3
        return env._observe()

    env.reset = reset


def test_meta_step_reports_episode_lengths():
    """``pre_length``/``post_length`` are the episodes' mean number of steps: the horizon for the
    half cheetah, 1 for ants that start above the healthy range (every episode ends at once)."""
    cheetah = MAMLRL(RLConfig(env="HalfCheetahVel", meta_batch=2, rollouts=2, horizon=12,
                              hidden=(8,)))
    metrics = cheetah.meta_step()
    assert metrics["pre_length"] == metrics["post_length"] == 12
    ant = MAMLRL(RLConfig(env="AntVel", meta_batch=2, rollouts=2, horizon=12, hidden=(8,)))
    _reset_in_the_air(ant.env)
    metrics = ant.meta_step()
    assert metrics["pre_length"] == metrics["post_length"] == 1


def _actions(steps: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Actions in [−1.5, 1.5]: about a third of them outside the control range."""
    return (torch.rand(steps, *shape, generator=torch.Generator().manual_seed(seed)) * 3 - 1.5)


@pytest.mark.parametrize("name", ["AntVel", "HalfCheetahDir"])
@pytest.mark.parametrize(("threads", "physics"), [(0, "gymnasium"), (2, "gymnasium"),
                                                  (0, "rllab")])
def test_rollout_is_bit_identical_to_a_loop_of_mj_step(name, threads, physics):
    """Every environment evolves exactly as one MjData stepped by ``mj_step``: each action held
    for ``frame_skip`` steps, from a zero solver warm start (the batched rollout starts every
    action's steps from the stored state alone), until its episode ends; from then on its state
    stays as it ended while the others run on."""
    steps = 20 if physics == "gymnasium" else 50
    env = make_env(name, horizon=steps, env_threads=threads, physics=physics)
    env.reset_task(torch.tensor([0.5, 1.0]))
    env.reset(3, torch.Generator().manual_seed(0))
    full = mujoco.mjtState.mjSTATE_FULLPHYSICS
    datas = [mujoco.MjData(env.model) for _ in range(6)]
    for d, state in zip(datas, env._state, strict=True):
        mujoco.mj_setState(env.model, d, state, full)
    low, high = env.model.actuator_ctrlrange.T
    ended = np.zeros(6, dtype=bool)
    for action in _actions(steps, (2, 3, env.act_dim)):
        _, _, done = env.step(action)
        for d, a, state, end in zip(datas, action.reshape(6, -1).double().numpy(), env._state,
                                    ended, strict=True):
            if end:
                continue  # d keeps the state the episode ended in
            d.qacc_warmstart[:] = 0
            d.ctrl[:] = np.clip(a, low, high)
            mujoco.mj_step(env.model, d, nstep=env.frame_skip)
            expected = np.empty_like(state)
            mujoco.mj_getState(env.model, d, expected, full)
            np.testing.assert_array_equal(state, expected)
        ended = done.view(-1).numpy()
    if name == "AntVel" and physics == "gymnasium":  # (rllab's ant stands longer)
        assert 0 < ended.sum() < 6  # the actions end some episodes and not others


GYMNASIUM = {
    "half_cheetah": ("HalfCheetah-v5", {}),
    "ant": ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
}


RLLAB_TIMESTEP = {"ant": 0.02, "half_cheetah": 0.01}
"""The ``<option timestep>`` of rllab's ant.xml and half_cheetah.xml, which set no frame skip."""


@pytest.mark.parametrize("physics", ["gymnasium", "rllab"])
@pytest.mark.parametrize(("name", "goal"), [("AntDir", -1.0), ("AntVel", 1.3),
                                            ("HalfCheetahVel", 1.3), ("HalfCheetahDir", -1.0)])
def test_dynamics_and_rewards_match_gymnasium(name, goal, physics):
    """One rollout, step by step, against gymnasium's v5 environment from the same state with the
    same actions (a third outside [−1, 1]): the same observations and episode ends
    (``terminated``), and the module doc's task reward of gymnasium's forward velocity and the
    clipped action. ``physics="rllab"`` is compared with the v5 environment stepped as the
    authors' rllab models are: one physics step of rllab's timestep per action.

    Ant-v5's ``info["x_velocity"]`` differs from the velocity of the step: it is taken from the
    torso's ``xpos``, which ``mj_step`` leaves at the last Runge–Kutta stage rather than at the
    step's end (here by up to 2 mm, 0.04 in velocity); the ant's velocity is therefore taken from
    gymnasium's ``qpos``, which HalfCheetah-v5's ``x_velocity`` is."""
    gym = pytest.importorskip("gymnasium")
    env = make_env(name, horizon=50, physics=physics)
    robot = "ant" if name.startswith("Ant") else "half_cheetah"
    gym_id, options = GYMNASIUM[robot]
    reference = gym.make(gym_id, frame_skip=5 if physics == "gymnasium" else 1,
                         **options).unwrapped
    if physics == "rllab":
        reference.model.opt.timestep = RLLAB_TIMESTEP[robot]
    assert env.dt == reference.dt == {"gymnasium": 0.05, "rllab": RLLAB_TIMESTEP[robot]}[physics]
    reference.reset(seed=0)
    env.reset_task(torch.tensor([goal]))
    env.reset(1, torch.Generator().manual_seed(0))
    reference.set_state(env._state[0, env._qpos], env._state[0, env._qvel])
    ctrl_cost, bonus = (0.005, 0.05) if name.startswith("Ant") else (0.05, 0.0)
    bonus += 1.0 if name == "AntVel" else 0.0
    for action in _actions(50, (1, 1, env.act_dim)):
        x_before = reference.data.qpos[0]
        expected_obs, _, terminated, _, info = reference.step(action.view(-1).numpy())
        velocity = (reference.data.qpos[0] - x_before) / reference.dt
        if gym_id == "HalfCheetah-v5":
            assert info["x_velocity"] == velocity
        clipped = action.view(-1).double().clamp(-1, 1)
        forward = -abs(velocity - goal) if name.endswith("Vel") else goal * velocity
        expected_reward = forward + bonus - ctrl_cost * clipped.square().sum().item()
        obs, reward, done = env.step(action)
        assert done.item() == terminated
        torch.testing.assert_close(obs.view(-1), torch.from_numpy(expected_obs).float())
        torch.testing.assert_close(reward.view(()), torch.tensor(expected_reward).float())
        if terminated:
            break


@pytest.mark.parametrize("robot", ["Ant", "HalfCheetah"])
def test_rllab_physics_resets_to_rllabs_initial_pose_with_its_noise(robot):
    """rllab resets qpos to its model's initial pose (the ant's ``init_qpos``: standing on bent
    legs, torso at 0.55; the cheetah's model pose) plus 0.01·N(0, 1), and qvel to 0.1·N(0, 1)."""
    pose = {"Ant": [0, 0, 0.55, 1, 0, 0, 0, 0, 1, 0, -1, 0, -1, 0, 1],
            "HalfCheetah": [0.0] * 9}[robot]
    env = make_env(f"{robot}Vel", physics="rllab")
    env.reset_task(torch.zeros(4))
    env.reset(500, torch.Generator().manual_seed(0))
    qpos, qvel = (torch.from_numpy(env._state[:, part]) for part in (env._qpos, env._qvel))
    torch.testing.assert_close(qpos.mean(0), torch.tensor(pose, dtype=torch.float64),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(qpos.std(0), torch.full((len(pose),), 0.01, dtype=torch.float64),
                               atol=1.5e-3, rtol=0)
    torch.testing.assert_close(qvel.mean(0), torch.zeros(qvel.shape[1], dtype=torch.float64),
                               atol=2e-2, rtol=0)
    torch.testing.assert_close(qvel.std(0), torch.full((qvel.shape[1],), 0.1,
                                                       dtype=torch.float64), atol=1e-2, rtol=0)


def test_ended_ant_episode_stays_ended_and_the_sampler_masks_it():
    """An ant dropped from above the healthy range ends its episode on its first step, as
    gymnasium's Ant-v5 reports ``terminated``; from then on it is no longer simulated (its state
    stays, reward 0, ``done``) until ``reset``, and the sampler masks every step after an
    episode's end."""
    gym = pytest.importorskip("gymnasium")
    env = make_env("AntVel", horizon=20)
    reference = gym.make("Ant-v5", frame_skip=5, include_cfrc_ext_in_observation=False).unwrapped
    reference.reset(seed=0)
    env.reset_task(torch.tensor([1.0]))
    env.reset(1, torch.Generator().manual_seed(0))
    env._state[0, env._qpos.start + 2] = 1.3
    reference.set_state(env._state[0, env._qpos], env._state[0, env._qvel])
    actions = _actions(3, (1, 1, env.act_dim))
    _, _, terminated, _, _ = reference.step(actions[0].view(-1).numpy())
    obs, _, done = env.step(actions[0])
    assert terminated and done.item()
    for action in actions[1:]:
        later_obs, reward, done = env.step(action)
        assert torch.equal(later_obs, obs) and reward.item() == 0.0 and done.item()
    env.reset(1, torch.Generator().manual_seed(0))
    assert not env.step(actions[0])[2].item()

    policy = GaussianMLPPolicy(env.obs_dim, env.act_dim, hidden=(8,))
    env.reset_task(torch.tensor([1.0, 2.0]))
    _reset_in_the_air(env)
    episodes = sample_episodes(policy, dict(policy.named_parameters()), env, 3,
                               torch.Generator().manual_seed(0))
    assert episodes.masks[..., 0].all() and episodes.masks.sum() == 6  # all end at once


@pytest.mark.parametrize("height", [0.1, 0.2, 0.6, 1.0, 1.3, float("nan")])
def test_ant_healthy_rule_is_gymnasiums(height):
    """The end-of-episode rule at a given torso height (NaN: a state that is not finite) is
    Ant-v5's ``is_healthy`` (and the half cheetah's episodes never end)."""
    gym = pytest.importorskip("gymnasium")
    reference = gym.make("Ant-v5", include_cfrc_ext_in_observation=False).unwrapped
    reference.reset(seed=0)
    env = make_env("AntVel", horizon=2)
    env.reset_task(torch.tensor([1.0]))
    env.reset(1, torch.Generator().manual_seed(0))
    env._state[0, env._qpos.start + 2] = height
    reference.set_state(env._state[0, env._qpos], env._state[0, env._qvel])
    assert env._unhealthy().item() == (not reference.is_healthy)
    cheetah = make_env("HalfCheetahVel", horizon=2)
    cheetah.reset_task(torch.tensor([1.0]))
    cheetah.reset(1, torch.Generator().manual_seed(0))
    cheetah._state[0, cheetah._qpos.start + 1] = height
    assert not cheetah._unhealthy().any()


def test_threads_default_to_the_available_cpus():
    assert RLConfig().env_threads is None
    env = make_env("AntDir", horizon=2)
    assert env._rollout.nthread == default_threads() and len(env._data) == max(default_threads(), 1)


def test_default_threads_share_the_cpus_among_torchrun_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads() == 0  # one CPU each: the calling thread
