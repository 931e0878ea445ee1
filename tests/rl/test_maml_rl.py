"""The MAML-RL trainer: configuration errors, checkpoint round trip, learning on 2-D navigation."""

import pytest
import torch
from resume_check import assert_resumes_exactly

from metagrad.errors import CheckpointError, ConfigError
from metagrad.rl.maml_rl import MAMLRL, RLConfig


def test_unknown_env_name_is_refused_when_the_env_is_built():
    with pytest.raises(ConfigError, match="unknown RL environment 'HalfCheetah'"):
        MAMLRL(RLConfig(env="HalfCheetah"))


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "reptile"}, "method"),
    ({"hvp": "fisher"}, "hvp"),
    ({"meta_batch": 0}, "meta_batch"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"inner_lr": 0.0}, "inner_lr"),
    ({"ls_backtrack": 1.5}, "ls_backtrack"),
    ({"gamma": 1.2}, "gamma"),
    ({"fvp_fraction": 0.0}, "fvp_fraction"),
])
def test_config_errors_name_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        RLConfig(**settings)


def test_config_from_dict_rejects_unknown_keys():
    assert RLConfig.from_dict({"hidden": [4, 4]}).hidden == (4, 4)
    with pytest.raises(ConfigError, match="inner_lrr"):
        RLConfig.from_dict({"inner_lrr": 0.1})


def tiny(**settings) -> RLConfig:
    return RLConfig(meta_batch=3, rollouts=4, horizon=15, hidden=(16,), **settings)


def test_state_dict_round_trip_resumes_identically():
    state = assert_resumes_exactly(lambda: MAMLRL(tiny()),
                                   ("pre_return", "post_return", "surrogate_after", "kl"))
    with pytest.raises(CheckpointError, match="hidden"):
        MAMLRL(RLConfig(hidden=(8,))).load_state_dict(state)
    with pytest.raises(CheckpointError, match="missing"):
        MAMLRL(tiny()).load_state_dict({"policy": {}})


@pytest.mark.parametrize("settings", [{"first_order": True}, {"hvp": "finite_difference"},
                                      {"hvp": "gauss_newton"}, {"method": "pretrain"},
                                      {"fvp_fraction": 1.0}, {"inner_steps": 2}])
def test_variants_take_a_trust_region_step(settings):
    trainer = MAMLRL(tiny(**settings))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.meta_step()
    assert 0 < metrics["kl"] <= trainer.config.max_kl
    assert metrics["surrogate_after"] < metrics["surrogate_before"]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(),
                                                     strict=True))
    returns = trainer.evaluate(steps=2, rollouts=3)
    assert len(returns) == 3


@pytest.mark.slow
def test_navigation2d_learns_to_adapt():
    torch.set_num_threads(1)
    trainer = MAMLRL(RLConfig(meta_batch=10, rollouts=10, seed=0))
    first = trainer.meta_step()
    for _ in range(7):
        trainer.meta_step()
    pre, post = trainer.evaluate(steps=1, rollouts=10)
    assert post > pre + 3.0, (pre, post)  # one gradient step adapts the policy to the task
    assert post > first["post_return"] + 30.0, (first["post_return"], post)  # and it learned


def test_fvp_fraction_changes_only_the_trust_region_metric():
    """Same episodes, same gradient; a Fisher on one task of three gives another step."""
    full, sub = MAMLRL(tiny(fvp_fraction=1.0)), MAMLRL(tiny(fvp_fraction=0.34))
    a, b = full.meta_step(), sub.meta_step()
    assert a["pre_return"] == b["pre_return"] and a["post_return"] == b["post_return"]
    assert a["surrogate_before"] == pytest.approx(b["surrogate_before"], abs=1e-7)
    assert not all(torch.equal(p, q) for p, q in zip(full.policy.parameters(),
                                                     sub.policy.parameters(), strict=True))
    assert b["kl"] <= sub.config.max_kl  # the line search checks the full KL


def test_the_policy_lives_on_the_configured_device():
    assert MAMLRL(tiny(device="cpu")).policy.log_std.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            MAMLRL(tiny(device="cuda"))
