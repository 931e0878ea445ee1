"""The gymnasium adapter: rollouts equal stepping the environments by hand, determinism from the
seed, MAML-RL on a user's environment; env objects and import paths accepted by the learner."""

import numpy as np
import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.rl.envs import ENVS, GymnasiumTasks, Navigation2D, env_from_config, make_env
from metagrad.rl.maml_rl import MAMLRL, RLConfig

gymnasium = pytest.importorskip("gymnasium", reason="the adapter needs: pip install 'metagrad[rl]'")


class PointGoal(gymnasium.Env):
    """A point starting near the origin moves by its action (at most 0.1 per coordinate) towards
    a goal set by ``set_task``; reward −‖x − g‖; terminated within 0.1 of the goal."""

    observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gymnasium.spaces.Box(-0.1, 0.1, (2,), np.float32)

    def __init__(self) -> None:
        self.goal = np.zeros(2)
        self.position = np.zeros(2)

    def set_task(self, goal: np.ndarray) -> None:
        self.goal = np.asarray(goal, dtype=np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-0.05, 0.05, 2)
        return self.position.copy(), {}

    def step(self, action):
        self.position = self.position + np.asarray(action, dtype=np.float64)
        distance = float(np.linalg.norm(self.position - self.goal))
        return self.position.copy(), -distance, distance < 0.1, False, {}


def sample_goals(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 2, generator=generator) - 0.5


def adapter(horizon: int = 12) -> GymnasiumTasks:
    return GymnasiumTasks(PointGoal, sample_goals, horizon=horizon)


def test_rollouts_equal_stepping_the_environments_by_hand():
    env = adapter(horizon=6)
    assert (env.obs_dim, env.act_dim, env.horizon) == (2, 2, 6)
    goals = torch.tensor([[0.1, 0.0], [-0.3, 0.2]])
    env.reset_task(goals)
    generator = torch.Generator().manual_seed(5)
    seeds = torch.randint(2**31, (6,), generator=torch.Generator().manual_seed(5)).tolist()
    obs = env.reset(3, generator)
    by_hand = []
    for j, seed in enumerate(seeds):
        copy = PointGoal()
        copy.set_task(goals[j // 3].numpy())
        by_hand.append(copy)
        first, _ = copy.reset(seed=seed)
        torch.testing.assert_close(obs[j // 3, j % 3], torch.as_tensor(first, dtype=torch.float32))
    actions = torch.randn(6, 2, 3, 2, generator=torch.Generator().manual_seed(0)) * 0.2
    actions[:, 0, 0] = torch.tensor([0.5, 0.0])  # clipped to 0.1: task 0's first rollout ends
    done_by_hand = np.zeros(6, dtype=bool)
    for t in range(6):
        obs, reward, done = env.step(actions[t])
        assert obs.dtype == reward.dtype == torch.float32 and done.dtype == torch.bool
        for j, copy in enumerate(by_hand):
            i, r = divmod(j, 3)
            if done_by_hand[j]:  # finished: not stepped, last observation, reward 0, still done
                assert reward[i, r] == 0 and done[i, r]
                continue
            action = np.clip(actions[t, i, r].numpy(), -0.1, 0.1)
            o, rew, terminated, truncated, _ = copy.step(action)
            torch.testing.assert_close(obs[i, r], torch.as_tensor(o, dtype=torch.float32))
            assert reward[i, r].item() == pytest.approx(rew, abs=1e-6)
            done_by_hand[j] = terminated or truncated
            assert bool(done[i, r]) == (done_by_hand[j] or t == 5)  # the horizon ends them all
    assert done_by_hand[0]


def test_episodes_are_a_function_of_the_seed():
    def episode_returns(seed: int) -> torch.Tensor:
        trainer = MAMLRL(RLConfig(env="my-point-goal", meta_batch=2, rollouts=2, hidden=(8,),
                                  seed=seed), env=adapter())
        return torch.stack([ep.returns() for ep in trainer.adaptation(
            trainer.sample_tasks(), steps=1, rollouts=2, seed=seed)])

    torch.testing.assert_close(episode_returns(0), episode_returns(0), rtol=0, atol=0)
    assert not torch.equal(episode_returns(0), episode_returns(1))


def test_maml_rl_trains_on_a_gymnasium_environment():
    torch.set_num_threads(1)
    trainer = MAMLRL(RLConfig(env="my-point-goal", meta_batch=3, rollouts=4, hidden=(16,),
                              inner_steps=2), env=adapter())
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    steps_taken = 0
    for _ in range(3):
        metrics = trainer.meta_step()
        assert all(np.isfinite(v) for v in metrics.values())
        assert metrics["kl"] <= trainer.config.max_kl
        steps_taken += metrics["step_fraction"] > 0
    assert steps_taken >= 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(),
                                                     strict=True))
    assert len(trainer.evaluate(steps=1, rollouts=2)) == 2


def test_only_box_spaces_and_a_task_hook_are_accepted():
    class Discrete(PointGoal):
        action_space = gymnasium.spaces.Discrete(4)

    with pytest.raises(ConfigError, match="action space must be a gymnasium.spaces.Box"):
        GymnasiumTasks(Discrete, sample_goals, horizon=5)
    with pytest.raises(ConfigError, match="no method 'choose_goal'"):
        GymnasiumTasks(PointGoal, sample_goals, set_task="choose_goal", horizon=5)
    with pytest.raises(ConfigError, match="needs a horizon"):
        GymnasiumTasks(PointGoal, sample_goals)
    chosen = []
    env = GymnasiumTasks(PointGoal, sample_goals, horizon=5,
                         set_task=lambda e, task: chosen.append(task.tolist()))
    env.reset_task(torch.tensor([[0.25, 0.5]]))
    env.reset(2, torch.Generator().manual_seed(0))
    assert chosen == [[0.25, 0.5]] * 2


def test_envs_by_name_or_import_path_and_checkpoints_of_such_runs():
    assert list(ENVS) == ["navigation2d", "halfcheetahvel", "halfcheetahdir", "antvel", "antdir"]
    assert "Half-Cheetah_Vel" in ENVS
    path = "metagrad.rl.envs.navigation2d:from_config"
    env = env_from_config(RLConfig(env=path, horizon=7, nav_reward="squared_distance"))
    assert isinstance(env, Navigation2D) and env.horizon == 7 and env.squared_distance
    assert make_env("navigation2d", device="cpu").horizon == 100
    with pytest.raises(ConfigError, match="cannot import module"):
        make_env("no_such_package.envs:factory")
    trainer = MAMLRL(RLConfig(env=path, meta_batch=2, rollouts=2, horizon=5, hidden=(8,)))
    trainer.meta_step()
    resumed = MAMLRL(RLConfig(env=path, meta_batch=2, rollouts=2, horizon=5, hidden=(8,)))
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.iteration == 1
