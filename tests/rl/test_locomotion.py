"""MuJoCo locomotion tasks (skipped without the optional ``mujoco``)."""

import sys

import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.rl.envs import make_env

mujoco = pytest.importorskip("mujoco", reason="MuJoCo tasks need: pip install 'metagrad[rl]'")

from metagrad.rl.maml_rl import MAMLRL, RLConfig  # noqa: E402


def test_missing_mujoco_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(ConfigError, match=r"metagrad\[rl\]"):
        make_env("HalfCheetahVel")


def test_half_cheetah_vel_reward_and_determinism():
    env = make_env("HalfCheetahVel", horizon=5)
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
