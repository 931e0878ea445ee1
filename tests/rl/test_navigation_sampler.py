"""2-D navigation dynamics checked by hand, and the batched sampler."""

import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.models.policies import GaussianMLPPolicy
from metagrad.rl.envs import Navigation2D, make_env
from metagrad.rl.sampler import sample_episodes


def test_navigation_dynamics_by_hand():
    env = Navigation2D()
    env.reset_task(torch.tensor([[0.3, -0.2], [0.05, 0.0]]))
    obs = env.reset(2)
    assert obs.shape == (2, 2, 2) and (obs == 0).all()
    actions = torch.tensor([[[0.5, -0.05], [-0.02, 0.03]],   # task 0
                            [[0.05, 0.004], [1.0, 1.0]]])     # task 1
    obs, reward, done = env.step(actions)
    expected = torch.tensor([[[0.1, -0.05], [-0.02, 0.03]],   # clipped to ±0.1
                             [[0.05, 0.004], [0.1, 0.1]]])
    torch.testing.assert_close(obs, expected)
    goals = torch.tensor([[0.3, -0.2], [0.05, 0.0]])[:, None]
    torch.testing.assert_close(reward, -((expected - goals) ** 2).sum(-1))  # after the move
    assert done.tolist() == [[False, False], [True, False]]  # 0.004 < 0.01 from the goal
    assert reward[0, 0].item() == pytest.approx(-(0.2 ** 2 + 0.15 ** 2))


def test_navigation_normalized_actions_are_in_units_of_the_bound():
    env = Navigation2D(normalized_actions=True)
    env.reset_task(torch.tensor([[0.3, -0.2]]))
    env.reset(1)
    obs, _, _ = env.step(torch.tensor([[[0.5, -3.0]]]))
    torch.testing.assert_close(obs, torch.tensor([[[0.05, -0.1]]]))  # 0.1·a, clipped to ±0.1


def test_navigation_negative_distance_option_and_task_sampling():
    env = Navigation2D(squared_distance=False)
    env.reset_task(torch.tensor([[0.3, 0.4]]))
    env.reset(1)
    _, reward, _ = env.step(torch.zeros(1, 1, 2))
    assert reward.item() == pytest.approx(-0.5)
    goals = env.sample_tasks(1000, torch.Generator().manual_seed(0))
    assert goals.shape == (1000, 2) and goals.abs().max() <= 0.5 and goals.abs().max() > 0.45
    with pytest.raises(ConfigError, match="shape"):
        env.reset_task(torch.zeros(3))
    with pytest.raises(ConfigError, match="unknown RL environment"):
        make_env("navigation3d")


def test_sampler_masks_stop_at_done_and_per_task_params_agree():
    env = Navigation2D(horizon=30)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 2, hidden=(8,))
    with torch.no_grad():
        policy.log_std.fill_(-20.0)  # deterministic: always the mean action
        policy.mean[-1].weight.zero_()
        policy.mean[-1].bias.copy_(torch.tensor([0.1, 0.0]))  # move right at full speed
    env.reset_task(torch.tensor([[0.3, 0.0], [-0.3, 0.0]]))
    params = {n: p.detach() for n, p in policy.named_parameters()}
    episodes = sample_episodes(policy, params, env, 3, torch.Generator().manual_seed(0))
    assert episodes.obs.shape == (2, 3, 30, 2) and episodes.rewards.shape == (2, 3, 30)
    assert episodes.masks[0].sum(-1).tolist() == [3.0, 3.0, 3.0]  # reaches x = 0.3 at step 3
    assert episodes.masks[1].sum(-1).tolist() == [30.0] * 3  # walks away: full horizon
    assert (episodes.rewards[0, :, 3:] == 0).all()
    stacked = {n: p.expand(2, *p.shape) for n, p in params.items()}
    again = sample_episodes(policy, stacked, env, 3, torch.Generator().manual_seed(0),
                            per_task=True)
    torch.testing.assert_close(again.rewards, episodes.rewards)
    torch.testing.assert_close(again.actions, episodes.actions)
