"""Meta-RL runs: run-directory files, eval.json, exact resume, clean stop on SIGINT, corrupt
checkpoints refused, settings resolved per environment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad.cli import main
from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError, ConfigError
from metagrad.rl.maml_rl import MAMLRL
from metagrad.rl.settings import RLConfig
from metagrad.training import checkpoint as ckpt
from metagrad.training.loop import read_config, train
from metagrad.training.rl import (
    FINE_TUNE_SCALES,
    RLJob,
    evaluate_rl_run,
    resolve_rl,
    rl_config_from_dict,
    tune_fine_tuning,
    validation_return,
)
from metagrad.training.run import Run, RunDirectory

TINY = dict(meta_batch=3, rollouts=3, horizon=20, hidden=(16,), iterations=4, checkpoint_every=2,
            val_every=2, val_tasks=2, eval_steps=2)


def tiny(**settings) -> RLConfig:
    return RLConfig(**{**TINY, **settings})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    train(tiny(), run_dir, progress=False)
    return run_dir


def test_run_directory_holds_config_metrics_and_checkpoints(run):
    assert isinstance(read_config(run), RLConfig)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for name in ("maml", "pretrained"):
        for key in ("pre_return", "post_return", "kl", "step_fraction", "seconds"):
            assert f"{name}/{key}" in records[0]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.safetensors", "ckpt-0000002.safetensors", "ckpt-0000004.safetensors"]
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(tiny(), run, progress=False)


def test_best_checkpoint_is_the_best_validated_one(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validated = {r["iteration"]: r["maml/val_return"] for r in records if "maml/val_return" in r}
    assert sorted(validated) == [2, 4]
    best = ckpt.load(run / "checkpoints" / "best.safetensors")
    assert best["iteration"] == max(validated, key=validated.get)
    assert best["best"] == max(validated.values())
    # validation is deterministic: the best policy re-validates to its recorded value
    directory = RunDirectory(run)
    job = RLJob(tiny(), directory, Distributed())
    Run(job, directory, tiny().to_dict()).load_state(best)
    assert job.validate() == pytest.approx(best["best"], abs=1e-5)


def test_baselines_fine_tune_with_the_step_size_that_validates_best():
    learner = MAMLRL(tiny(val_tasks=4, method="pretrain"))
    with torch.no_grad():  # a collapsed std, as pretraining leaves it: α = 0.1 overshoots
        learner.policy.log_std.fill_(-4.0)
    tuned = tune_fine_tuning(learner)
    scale = tuned.config.inner_lr / learner.config.inner_lr
    assert any(scale == pytest.approx(s) for s in FINE_TUNE_SCALES)
    assert tuned.config.eval_inner_lr == pytest.approx(scale * learner.config.eval_inner_lr)
    assert tuned.config.inner_lr < learner.config.inner_lr
    assert validation_return(tuned) > validation_return(learner)
    for a, b in zip(tuned.policy.parameters(), learner.policy.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("inner_steps, expected", [(1, [0.1, 0.05, 0.05]),
                                                    (2, [0.1, 0.1, 0.05])])
def test_evaluation_adapts_with_the_trained_step_size_for_the_trained_steps(
        monkeypatch, inner_steps, expected):
    """App. A.2: α = inner_lr for the steps trained through, eval_inner_lr after them."""
    import metagrad.rl.maml_rl as maml_rl

    used = []
    real = maml_rl.adapt

    def recording(*args, lr, **kwargs):
        used.append(lr)
        return real(*args, lr=lr, **kwargs)

    monkeypatch.setattr(maml_rl, "adapt", recording)
    learner = MAMLRL(tiny(inner_steps=inner_steps))
    learner.task_returns(learner.env.sample_tasks(2, torch.Generator().manual_seed(0)), 3, 2, 1)
    assert used == pytest.approx(expected)


def test_validation_tasks_do_not_depend_on_the_training_seed():
    one, two = MAMLRL(tiny(seed=0)), MAMLRL(tiny(seed=1))
    assert not torch.equal(one.sample_tasks(), two.sample_tasks())  # training streams differ
    two.policy.load_state_dict(one.policy.state_dict())
    assert validation_return(one) == validation_return(two)


def test_eval_json_has_every_method_and_step(run):
    rows, figures = evaluate_rl_run(run, tasks=4, steps=2, rollouts=3, which="last")
    report = json.loads((run / "eval.json").read_text())
    assert (report["metric"], report["checkpoint"], report["iteration"]) == (
        "return", "ckpt-0000004.safetensors", 4)
    assert report["step_sizes"]["maml"] == [0.1, 0.05]  # MAML adapts with the α it trained for
    got = {(r["method"], r["steps"]) for r in report["results"]}
    assert got == {(m, s) for m in ("maml", "pretrained", "random") for s in range(3)}
    for r in report["results"]:
        assert (r["shots"], r["tasks"], r["split"]) == (3, 4, "test")
        assert r["mean"] < 0 and r["ci95"] > 0
    assert len(rows) == 9
    assert [f.name for f in figures] == ["return_vs_steps.png", "trajectories.png"]
    assert all(f.stat().st_size > 0 for f in figures)
    evaluate_rl_run(run, tasks=2, steps=0, rollouts=2, which="best")
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == "best.safetensors"


def test_test_tasks_follow_eval_seed(run, tmp_path):
    """The same checkpoint meets the same test tasks under one ``eval_seed`` (the default 0),
    other tasks under another; eval.json records the seed."""
    def returns(name, **kwargs):
        rows, _ = evaluate_rl_run(run, tasks=3, steps=0, rollouts=2, which="last",
                                  out=tmp_path / name, **kwargs)
        return [r.mean for r in rows]

    assert returns("default") == returns("zero", eval_seed=0) != returns("one", eval_seed=1)
    assert json.loads((tmp_path / "one" / "eval.json").read_text())["eval_seed"] == 1


def test_cli_eval_prints_the_table_and_step_sizes(run, capsys):
    main(["eval", str(run), "--tasks", "2", "--steps", "1", "--rollouts", "2"])
    out = capsys.readouterr().out
    assert "maml" in out and "pretrained" in out and "random" in out
    assert "step sizes" in out and "maml 0.1, 0.05" in out


@pytest.mark.parametrize("flags", [["--report-steps", "0", "1"], ["--no-baselines"]])
def test_cli_eval_refuses_supervised_only_flags_on_an_rl_run(run, capsys, flags):
    assert main(["eval", str(run), "--tasks", "2", "--steps", "1", "--rollouts", "2"]
                + flags) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} applies to supervised runs" in err and "Traceback" not in err


def _trajectory(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock entries."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_bit_identically(run, tmp_path):
    half = tmp_path / "half"
    train(tiny(iterations=2), half, progress=False)
    trainer = train(None, half, resume=True, iterations=4, progress=False)
    assert trainer.iteration == 4
    assert _trajectory(half) == _trajectory(run)
    full = ckpt.load(run / "checkpoints" / "ckpt-0000004.safetensors")["learners"]
    for name, learner in trainer.job.learners.items():
        for key, value in learner.policy.state_dict().items():
            assert torch.equal(value, full[name]["policy"][key])


def test_sigint_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import torch; torch.set_num_threads(1)\n"
            "from metagrad.rl.settings import RLConfig\n"
            "from metagrad.training.loop import train\n"
            f"t = train(RLConfig(**{TINY!r} | dict(iterations=100000)), {str(run_dir)!r}, "
            "progress=False)\n"
            "print('stopped' if t.stopped else 'finished')\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by a signal" in out and out.strip().endswith("stopped")
    done = metrics.read_text().count("\n")
    latest = ckpt.CheckpointDir(run_dir / "checkpoints").latest()
    assert latest.name == f"ckpt-{done:07d}.safetensors"
    trainer = train(None, run_dir, resume=True, iterations=done + 1, progress=False)
    assert trainer.iteration == done + 1 and not trainer.stopped


def test_corrupt_checkpoint_is_refused(run, tmp_path):
    broken = tmp_path / "broken"
    train(tiny(iterations=2, baseline=False), broken, progress=False)
    latest = ckpt.CheckpointDir(broken / "checkpoints").latest()
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a metagrad checkpoint"):
        train(None, broken, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="not a metagrad checkpoint"):
        evaluate_rl_run(broken, which="last")
    with pytest.raises(ConfigError, match="not a run directory"):
        evaluate_rl_run(broken / "checkpoints")


def test_settings_resolve_per_environment_with_clear_errors():
    nav = resolve_rl({"iterations": "7", "hidden": "32,32", "threads": "none"})
    assert (nav.env, nav.meta_batch, nav.horizon, nav.iterations, nav.hidden, nav.threads) == (
        "navigation2d", 20, 100, 7, (32, 32), None)
    cheetah = resolve_rl({"env": "half-cheetah-vel", "baseline": "false"})
    assert (cheetah.meta_batch, cheetah.rollouts, cheetah.horizon, cheetah.inner_lr) == (
        40, 20, 200, 0.1)
    assert cheetah.baseline is False
    assert cheetah.physics == "gymnasium"
    ant = resolve_rl({"env": "antdir"})
    assert (ant.physics, ant.rollouts) == ("rllab", 40)
    assert resolve_rl({"env": "antvel", "physics": "gymnasium"}).physics == "gymnasium"
    # a run stored before the setting existed keeps the physics it trained with
    assert rl_config_from_dict({"env": "antvel"}).physics == "gymnasium"
    with pytest.raises(ConfigError, match="Did you mean 'meta_batch'"):
        resolve_rl({"meta_bach": "3"})
    with pytest.raises(ConfigError, match="rollouts: cannot read 'many' as int"):
        resolve_rl({"rollouts": "many"})
    with pytest.raises(ConfigError, match="first_order: cannot read 'maybe' as bool"):
        resolve_rl({"first_order": "maybe"})
    assert MAMLRL(tiny()).env.squared_distance is False
    assert MAMLRL(tiny(nav_reward="squared_distance")).env.squared_distance is True
