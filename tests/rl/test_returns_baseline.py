"""Discounted returns, GAE and the linear feature baseline against hand computations."""

import pytest
import torch

from metagrad.errors import ConfigError
from metagrad.rl.baselines import LinearFeatureBaseline
from metagrad.rl.returns import discounted_returns, gae

DT = torch.float64


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=DT)
    values = torch.tensor([[0.5, 1.0, 2.0, 7.0]], dtype=DT)  # the padded value is ignored
    masks = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DT)
    g, lam = 0.9, 0.5
    d2 = 3.0 - 2.0  # episode ends: V after the last step is 0
    d1 = 2.0 + g * 2.0 - 1.0
    d0 = 1.0 + g * 1.0 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    expected = torch.tensor([[a0, a1, a2, 0.0]], dtype=DT)
    torch.testing.assert_close(gae(rewards, values, masks, g, lam), expected)


def test_discounted_returns_batched_with_padding():
    rewards = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 5.0, 5.0]]], dtype=DT)
    masks = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]], dtype=DT)
    expected = torch.tensor([[[1 + 0.5 + 0.25, 1.5, 1.0], [2.0, 0.0, 0.0]]], dtype=DT)
    torch.testing.assert_close(discounted_returns(rewards, masks, 0.5), expected)


def test_masks_must_be_prefixes():
    with pytest.raises(ConfigError, match="prefix"):
        discounted_returns(torch.ones(1, 3), torch.tensor([[1.0, 0.0, 1.0]]))


def test_linear_baseline_matches_regularised_least_squares():
    g = torch.Generator().manual_seed(0)
    tasks, episodes, T, d = 3, 4, 6, 2
    obs = torch.randn(tasks, episodes, T, d, generator=g, dtype=DT) * 5
    returns = torch.randn(tasks, episodes, T, generator=g, dtype=DT)
    masks = torch.ones(tasks, episodes, T, dtype=DT)
    masks[:, 0, 4:] = 0.0  # a short episode
    baseline = LinearFeatureBaseline(reg_coeff=1e-3)
    weights = baseline.fit(obs, returns, masks)
    for i in range(tasks):
        keep = masks[i].reshape(-1).bool()
        o = obs[i].reshape(-1, d)[keep].clamp(-10, 10)
        t = (torch.arange(T, dtype=DT) / 100).repeat(episodes)[keep, None]
        phi = torch.cat([o, o ** 2, t, t ** 2, t ** 3, torch.ones_like(t)], dim=1)
        # ridge regression as ordinary least squares on [Φ; √c I] w ≈ [R; 0]
        aug = torch.cat([phi, 1e-3 ** 0.5 * torch.eye(phi.shape[1], dtype=DT)])
        target = torch.cat([returns[i].reshape(-1)[keep], torch.zeros(phi.shape[1], dtype=DT)])
        expected = torch.linalg.lstsq(aug, target[:, None]).solution[:, 0]
        torch.testing.assert_close(weights[i], expected, rtol=1e-6, atol=1e-8)
    values = baseline.predict(obs, masks, weights)
    assert values.shape == masks.shape and (values[:, 0, 4:] == 0).all()


def test_linear_baseline_raises_regularisation_on_singular_systems():
    obs = torch.zeros(1, 2, 3, 1, dtype=DT)  # o and o² columns are 0: singular without a ridge
    returns = torch.ones(1, 2, 3, dtype=DT)
    masks = torch.ones(1, 2, 3, dtype=DT)
    # 1e-320 is too small to help (NaN solution); ten-fold increases reach a usable ridge
    weights = LinearFeatureBaseline(reg_coeff=1e-320, max_tries=40).fit(obs, returns, masks)
    values = LinearFeatureBaseline().predict(obs, masks, weights)
    torch.testing.assert_close(values, returns)
    gave_up = LinearFeatureBaseline(reg_coeff=1e-320, max_tries=1).fit(obs, returns, masks)
    assert (gave_up == 0).all()
    with pytest.raises(ConfigError):
        LinearFeatureBaseline(reg_coeff=0.0)
