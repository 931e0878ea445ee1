"""The baselines' fine-tuning step sizes, chosen on validation tasks (training/evaluation.py
``tune_fine_tuning``), and their record in ``eval.json``."""

import json

import pytest
import torch
import torch.nn.functional as F

from metagrad import MAML
from metagrad.config import resolve
from metagrad.errors import ConfigError
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training.evaluation import (
    FINE_TUNE_SCALES,
    evaluation_curves,
    rows_from_curves,
    tune_fine_tuning,
)
from metagrad.training.loop import train
from metagrad.training.report import evaluate_run, format_gains

STEPS = 5


def validation_mse(learner, seed=7):
    curves = evaluation_curves(learner, SinusoidTasks(shots=10, queries=10), 40, STEPS, "mse",
                               torch.Generator().manual_seed(seed))
    return curves[:, -1].mean().item()


def scaled_baseline(scale):
    """A sinusoid network whose output layer is ``scale`` times its initialisation: the
    curvature of the loss grows as scale², so a step size good for the unscaled network
    overshoots."""
    torch.manual_seed(0)
    model = sinusoid_mlp()
    with torch.no_grad():
        model.head.weight.mul_(scale)
        model.fc1.weight.mul_(scale)
    return MAML(model, F.mse_loss, inner_lr=0.01)


def test_a_pathologically_scaled_baseline_picks_a_smaller_step_and_validates_better():
    learner = scaled_baseline(4.0)  # with 3 × inner_lr its fine-tuning diverges (inf)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    tuned = tune_fine_tuning(learner, SinusoidTasks(shots=10, queries=10), 40, STEPS, "mse",
                             seed=7)
    assert tuned.inner_lr < learner.inner_lr == 0.01
    assert any(tuned.inner_lr == pytest.approx(0.01 * s) for s in FINE_TUNE_SCALES)
    assert validation_mse(tuned) < validation_mse(learner)
    # the chosen step is the best candidate on those validation tasks
    for scale in FINE_TUNE_SCALES:
        other = scaled_baseline(4.0)
        other.inner_lr = 0.01 * scale
        assert not validation_mse(other) < validation_mse(tuned)
    # the learner itself is untouched
    assert learner.inner_lr == 0.01
    assert all(torch.equal(v, before[k]) for k, v in learner.state_dict().items())


def test_a_well_scaled_network_keeps_a_larger_step():
    tuned = tune_fine_tuning(scaled_baseline(1.0), SinusoidTasks(shots=10, queries=10), 40,
                             STEPS, "mse", seed=7)
    assert tuned.inner_lr >= 0.01


def test_the_chosen_step_size_replaces_untrained_per_element_rates():
    """A "scratch" network built with learn_inner_lr holds rates that would ignore inner_lr."""
    torch.manual_seed(0)
    model = scaled_baseline(4.0).model
    learner = MAML(model, F.mse_loss, inner_lr=0.01, learn_inner_lr=True)
    tuned = tune_fine_tuning(learner, SinusoidTasks(shots=10, queries=10), 40, STEPS, "mse",
                             seed=7)
    assert tuned.inner_rates is None and learner.inner_rates is not None
    assert tuned.inner_lr < 0.01
    assert validation_mse(tuned) < validation_mse(learner)


def test_no_steps_means_nothing_to_choose():
    learner = scaled_baseline(1.0)
    assert tune_fine_tuning(learner, SinusoidTasks(), 10, 0, "mse", seed=0) is learner


def test_eval_json_records_the_baselines_step_sizes(tmp_path, capsys):
    cfg = resolve("sinusoid", "paper", dict(iterations=20, val_every=1000, checkpoint_every=20,
                                            eval_tasks=20, eval_steps=2, log_every=10,
                                            val_tasks=10, eval_shots=[10], threads=1))
    train(cfg, tmp_path / "run", progress=False)
    evaluate_run(tmp_path / "run")
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(data["step_sizes"]) == {"pretrained", "scratch"}
    for lr in data["step_sizes"].values():
        assert any(lr == pytest.approx(cfg.inner_lr * s) for s in FINE_TUNE_SCALES)
    printed = capsys.readouterr().out
    assert "step sizes chosen on the validation tasks: pretrained" in printed


def test_cli_eval_at_report_steps_without_baselines_matches_the_full_evaluation(tmp_path,
                                                                               capsys):
    """``--report-steps`` measures only the listed steps, with the same numbers the full curve
    has there; ``--no-baselines`` leaves out (and does not tune) pretrained and scratch."""
    from metagrad.cli import main

    cfg = resolve("sinusoid", "paper", dict(iterations=20, val_every=1000, checkpoint_every=20,
                                            eval_tasks=20, eval_steps=6, val_tasks=10,
                                            eval_shots=[5], threads=1))
    train(cfg, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "full")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "sparse"),
                 "--report-steps", "0", "2", "6", "--no-baselines"]) == 0
    assert "step sizes chosen" in capsys.readouterr().out
    full, sparse = (json.loads((tmp_path / d / "eval.json").read_text())
                    for d in ("full", "sparse"))
    assert {r["method"] for r in full["results"]} == {"maml", "pretrained", "scratch"}
    assert sparse["step_sizes"] == {}
    expected = {r["steps"]: r["mean"] for r in full["results"] if r["method"] == "maml"}
    got = {r["steps"]: r["mean"] for r in sparse["results"]}
    assert [r["method"] for r in sparse["results"]] == ["maml"] * 3
    assert got.keys() == {0, 2, 6}
    assert got == pytest.approx({k: expected[k] for k in got}, rel=1e-5)


def test_test_tasks_follow_eval_seed_not_the_training_seed(tmp_path):
    """One checkpoint meets the same test tasks whatever the run's training ``seed``, other ones
    under another ``eval_seed``; a config.yaml written before ``eval_seed`` existed keeps the
    test tasks it was evaluated on (those of its training seed)."""
    import shutil

    import yaml

    cfg = resolve("sinusoid", "paper", dict(iterations=5, val_every=1000, checkpoint_every=5,
                                            eval_tasks=10, eval_steps=1, val_tasks=5,
                                            eval_shots=[5], threads=1))
    train(cfg, tmp_path / "run", progress=False)

    def means(run, **kwargs):
        rows, _ = evaluate_run(tmp_path / run, out=tmp_path / f"eval-{run}-{len(kwargs)}",
                               scratch=False, pretrained=False, **kwargs)
        return [r.mean for r in rows]

    def copy_with(name, edit):
        shutil.copytree(tmp_path / "run", tmp_path / name)
        path = tmp_path / name / "config.yaml"
        values = yaml.safe_load(path.read_text())
        edit(values)
        path.write_text(yaml.safe_dump(values))

    copy_with("seed3", lambda v: v.update(seed=3))
    copy_with("old-seed3", lambda v: (v.update(seed=3), v.pop("eval_seed")))
    base = means("run")
    assert means("seed3") == base
    assert means("run", eval_seed=3) != base
    assert means("old-seed3") == means("run", eval_seed=3)
    assert json.loads((tmp_path / "eval-old-seed3-0" / "eval.json").read_text())["eval_seed"] == 3
    with pytest.raises(ConfigError, match="--eval-seed must be an integer >= 0"):
        means("run", eval_seed=-1)


def test_the_scratch_row_does_not_depend_on_what_ran_before(tmp_path):
    """The scratch network's initialisation comes from the evaluation's seed, not from the
    process's random state (which depends on whatever ran before in it)."""
    cfg = resolve("sinusoid", "paper", dict(iterations=2, val_every=1000, checkpoint_every=2,
                                            eval_tasks=10, eval_steps=1, val_tasks=5,
                                            eval_shots=[5], threads=1, baseline=False))
    train(cfg, tmp_path / "run", progress=False)
    results = []
    for state in (1, 2):
        torch.manual_seed(state)
        rows, _ = evaluate_run(tmp_path / "run", out=tmp_path / f"ev{state}", pretrained=False)
        results.append({(r.method, r.steps): r.mean for r in rows})
    assert results[0] == results[1]
    assert {m for m, _ in results[0]} == {"maml", "scratch"}


def test_gain_intervals_are_paired_over_the_same_tasks():
    # tasks differ a lot (offsets), adaptation adds about 1 to each: the paired interval of the
    # change is that of the per-task differences, far narrower than the rows' own intervals
    g = torch.Generator().manual_seed(0)
    offsets = 10 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    curves = offsets + torch.tensor([0.0, 1.0, 1.5]) + 0.3 * torch.randn(40, 3, generator=g)
    rows = rows_from_curves(curves, "maml", 5, "test")
    assert rows[0].gain_ci95 is None and "gain_ci95" not in rows[0].to_dict()
    for i in (1, 2):
        diff = (curves[:, i] - curves[:, 0]).numpy()
        assert rows[i].gain_ci95 == pytest.approx(1.96 * diff.std(ddof=1) / len(diff) ** 0.5)
        assert rows[i].gain_ci95 < rows[i].ci95 / 5
        assert rows[i].to_dict()["gain_ci95"] == rows[i].gain_ci95
    text = format_gains(rows, "return")
    assert f"1 step: +{rows[1].mean - rows[0].mean:.3f}±{rows[1].gain_ci95:.3f}" in text
    assert f"2 steps: +{rows[2].mean - rows[0].mean:.3f}" in text
    # columns that do not start at 0 steps have no change to measure
    assert all(r.gain_ci95 is None for r in rows_from_curves(curves, "m", 5, "test",
                                                               steps=[1, 2, 3]))
    assert format_gains(rows[:1], "return") == ""
