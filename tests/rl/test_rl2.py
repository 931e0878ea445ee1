"""RL²: the recurrent policy's memory over a trial (carried across episodes, reset between trials
and independent across tasks), the whole-trial view matching what was sampled, the TRPO step's
trust region, training, exact resume, and the command line."""

import json

import pytest
import torch
from resume_check import assert_resumes_exactly

from metagrad.cli import main
from metagrad.errors import CheckpointError
from metagrad.models.policies import GaussianGRUPolicy
from metagrad.rl import learner as learner_module
from metagrad.rl import rl2
from metagrad.rl.maml_rl import MAMLRL
from metagrad.rl.objectives import OldPolicy, TaskData
from metagrad.rl.rl2 import RL2, sample_trials, whole_trials
from metagrad.rl.sampler import Episodes
from metagrad.rl.settings import RLConfig
from metagrad.rl.trpo import hessian_vector_product, trpo_step

TINY = dict(method="rl2", meta_batch=3, rollouts=2, horizon=10, hidden=(8,), max_kl=0.01)


class Scripted:
    """A batched env with rewards and episode ends under the test's control. Task = (reward
    scale s, step at which its episodes end); the observation is the position, moved by
    tanh(action); the reward of step t of the trial's k-th episode is s·(k + 1) − 0.1·t, plus
    ``bump`` at the first step of the first episode."""

    obs_dim = 2
    act_dim = 2

    def __init__(self, horizon: int = 4, bump: float = 0.0) -> None:
        self.horizon, self.bump = horizon, bump

    def reset_task(self, tasks: torch.Tensor) -> None:
        self.tasks, self.episode = tasks, -1

    def reset(self, rollouts: int, generator: torch.Generator) -> torch.Tensor:
        self.episode += 1
        self.t = 0
        self.position = torch.zeros(len(self.tasks), rollouts, 2)
        return self.position.clone()

    def step(self, actions: torch.Tensor):
        self.position = self.position + actions.tanh()
        scale, end = self.tasks[:, 0, None], self.tasks[:, 1, None]
        reward = (scale * (self.episode + 1) - 0.1 * self.t).expand(self.position.shape[:-1])
        if self.episode == 0 and self.t == 0:
            reward = reward + self.bump
        self.t += 1
        done = (self.t >= end).expand(reward.shape)
        return self.position.clone(), reward, done


def deterministic_policy(seed: int = 0, ignore_actions: bool = False) -> GaussianGRUPolicy:
    """A policy whose actions are its means (std e^−30); with ``ignore_actions`` the previous
    action does not enter the GRU, so only rewards, dones and observations shape its memory."""
    torch.manual_seed(seed)
    policy = GaussianGRUPolicy(2, 2, hidden=(8,))
    with torch.no_grad():
        policy.log_std.fill_(-30.0)
        if ignore_actions:
            policy.layers[0].weight_ih_l0[:, 2:4] = 0.0
    return policy


def trial_actions(policy, env, tasks, episodes, rollouts=2, seed=0):
    env.reset_task(tasks)
    return [ep.actions for ep in sample_trials(policy, env, episodes, rollouts,
                                                torch.Generator().manual_seed(seed))]


def test_hidden_state_carries_over_episode_boundaries():
    """A reward in episode 1 changes the action distribution at episode 2's first step, whose
    own inputs (observation, previous action and reward, done flag) are unchanged: only the
    hidden state carried across the boundary can pass it on."""
    policy = deterministic_policy(ignore_actions=True)
    tasks = torch.tensor([[1.0, 99.0]])
    plain = trial_actions(policy, Scripted(bump=0.0), tasks, 2)
    bumped = trial_actions(policy, Scripted(bump=5.0), tasks, 2)
    torch.testing.assert_close(bumped[0][:, :, 0], plain[0][:, :, 0])  # before the bump
    assert not torch.allclose(bumped[1][:, :, 0], plain[1][:, :, 0], atol=1e-4)


def test_hidden_state_resets_between_trials_and_tasks():
    """Every trial starts from the reset state (also after another trial ran), and tasks' trials
    do not interact: identical inputs give identical actions, whatever the other tasks do."""
    policy = deterministic_policy()
    x0 = policy.inputs(torch.zeros(2), torch.zeros(2), torch.zeros(()), torch.zeros(()))
    first_step = policy(x0[None, None])[0].loc[0, 0]
    env = Scripted(bump=3.0)
    tasks = torch.tensor([[1.0, 99.0], [1.0, 99.0], [-2.0, 2.0]])
    for _ in range(2):  # the second trial must not remember the first
        actions = trial_actions(policy, env, tasks, 3)
        torch.testing.assert_close(actions[0][:, :, 0], first_step.expand(3, 2, 2))
        for ep in actions:
            torch.testing.assert_close(ep[0], ep[1])  # identical tasks, identical trials
        assert not torch.allclose(actions[1][2], actions[1][0], atol=1e-4)  # task 2 differs


def test_whole_trials_replay_what_was_sampled():
    """Re-evaluating the policy on :func:`whole_trials` (episodes ending early, at different
    steps per task) gives the means the sampler acted with, on every valid step."""
    policy = deterministic_policy()
    env = Scripted(horizon=4)
    env.reset_task(torch.tensor([[1.0, 1.0], [0.5, 3.0], [2.0, 99.0]]))
    episodes = sample_trials(policy, env, 3, 2, torch.Generator().manual_seed(0))
    trial, inputs = whole_trials(episodes)
    assert trial.masks.sum((1, 2)).tolist() == [2 * 3 * 1, 2 * 3 * 3, 2 * 3 * 4]
    assert (trial.masks[..., 1:] <= trial.masks[..., :-1]).all()  # valid steps first
    with torch.no_grad():
        loc = policy(inputs)[0].loc
    valid = trial.masks.bool()
    torch.testing.assert_close(loc[valid], trial.actions[valid], rtol=1e-5, atol=1e-5)
    # the done flag marks each later episode's first step: task 0's episodes have 1 step
    torch.testing.assert_close(inputs[0, 0, :3, -1], torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(inputs[0, 0, 1:3, -2], trial.rewards[0, 0, :2])  # r_{t−1}


def test_trpo_step_keeps_the_mean_kl_within_max_kl(monkeypatch):
    """The KL between the policies before and after a meta-step, recomputed on the sampled
    trials, is positive (a step was taken), within max_kl, and the one reported."""
    sampled = []

    def recording(*args, **kwargs):
        sampled.append(sample_trials(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(rl2, "sample_trials", recording)
    learner = RL2(RLConfig(**{**TINY, "max_kl": 0.002}))
    before = GaussianGRUPolicy(2, 2, hidden=(8,))
    before.load_state_dict(learner.policy.state_dict())
    metrics = learner.meta_step()
    trial, inputs = whole_trials(sampled[0])
    with torch.no_grad():
        old, new = before(inputs)[0], learner.policy(inputs)[0]
        kl = torch.distributions.kl_divergence(old, new).sum(-1)
    m = trial.masks
    mean_kl = ((kl * m).sum((1, 2)) / m.sum((1, 2))).mean().item()
    assert 0 < mean_kl <= 0.002
    assert mean_kl == pytest.approx(metrics["kl"], rel=1e-3)


def test_gauss_newton_products_equal_the_exact_kl_hessian_through_the_gru():
    """At θ_old, the Fisher-vector products without double backward through the GRU equal the
    double-backward Hessian of the trials' KL (float64, episodes of unequal length)."""
    torch.manual_seed(0)
    policy = GaussianGRUPolicy(2, 2, hidden=(5, 4)).double()
    g = torch.Generator().manual_seed(1)
    tasks, rollouts, steps = 2, 3, 7
    inputs = torch.randn(tasks, rollouts, steps, policy.input_dim, generator=g, dtype=torch.double)
    masks = (torch.arange(steps) < torch.tensor([[7, 5, 2], [7, 7, 4]])[..., None]).double()
    actions = torch.randn(tasks, rollouts, steps, 2, generator=g, dtype=torch.double)
    episodes = Episodes(inputs[..., :2], actions, torch.zeros_like(masks), masks)
    with torch.no_grad():
        dist = policy(inputs)[0]
    old = OldPolicy(dist.log_prob(actions).sum(-1), dist.loc, dist.scale)
    objective = rl2.trial_objective(policy, TaskData(episodes, torch.randn_like(masks)), inputs,
                                    old)
    params = dict(policy.named_parameters())
    v = torch.randn(sum(p.numel() for p in params.values()), generator=g, dtype=torch.double)
    for subset in (None, [1]):
        kl = objective.kl(subset)
        assert float(kl(params).detach()) == pytest.approx(0.0, abs=1e-15)
        exact = hessian_vector_product(kl, params, mode="exact", damping=0.0)(v)
        fisher = hessian_vector_product(kl, params, mode="gauss_newton", damping=0.0)(v)
        assert exact.norm() > 1e-3
        torch.testing.assert_close(fisher, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("method", "hvp", "used"), [
    ("rl2", "auto", "gauss_newton"), ("maml", "auto", "exact"), ("rl2", "exact", "exact")])
def test_auto_hvp_picks_each_learners_faster_products(monkeypatch, method, hvp, used):
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["hvp"])
        return trpo_step(*args, **kwargs)

    monkeypatch.setattr(learner_module, "trpo_step", recording)
    config = RLConfig(**{**TINY, "method": method, "hvp": hvp})
    (RL2 if method == "rl2" else MAMLRL)(config).meta_step()
    assert seen == [used]


def test_meta_iterations_on_navigation_change_the_policy():
    learner = RL2(RLConfig(**TINY))
    start = [p.detach().clone() for p in learner.policy.parameters()]
    for _ in range(2):
        metrics = learner.meta_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        assert metrics["step_fraction"] > 0
    assert learner.iteration == 2
    assert any(not torch.equal(a, b) for a, b in zip(start, learner.policy.parameters()))
    returns = learner.evaluate(steps=2, rollouts=2)
    assert len(returns) == 3 and all(r < 0 for r in returns)


def test_state_dict_round_trip_resumes_bit_identically():
    state = assert_resumes_exactly(lambda: RL2(RLConfig(**TINY)),
                                   ("pre_return", "post_return", "surrogate_after", "kl"))
    resumed = RL2(RLConfig(**TINY))
    resumed.load_state_dict(state)
    assert resumed.iteration == 1
    with pytest.raises(CheckpointError, match="hidden"):
        RL2(RLConfig(**{**TINY, "hidden": (4,)})).load_state_dict(state)


def test_cli_trains_and_evaluates_rl2(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "rl", "--env", "navigation2d", "--method", "rl2", "--meta-batch", "2",
                 "--rollouts", "2", "--horizon", "5", "--hidden", "8", "--iterations", "2",
                 "--val-every", "1", "--val-tasks", "2", "--eval-tasks", "2",
                 "--eval-rollouts", "2", "--eval-steps", "1", "--threads", "1",
                 "--no-progress", "--out", str(run)])
    assert code == 0
    report = json.loads((run / "eval.json").read_text())
    got = {(r["method"], r["steps"]) for r in report["results"]}
    assert got == {(m, s) for m in ("rl2", "random") for s in (0, 1)}
    assert list(report["step_sizes"]) == ["random"]  # RL² takes no gradient steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "rl2/post_return" in records[-1] and "rl2/val_return" in records[-1]
    assert "rl2" in capsys.readouterr().out
