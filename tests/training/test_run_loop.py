"""The one run loop (metagrad.training.run) under what users and operating systems do to it:
concurrent trainings, kills at random moments, resume and extension, devices."""

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad.cli import main
from metagrad.config import resolve
from metagrad.errors import ConfigError
from metagrad.training import checkpoint as ckpt
from metagrad.training.loop import train
from metagrad.training.run import Progress
from metagrad.training.supervised import cosine_lr

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def small(**kw):
    base = dict(iterations=40, val_every=1000, checkpoint_every=20, eval_tasks=20, eval_steps=2,
                log_every=1, val_tasks=10, meta_batch=5, baseline=False, threads=1)
    return resolve("sinusoid", "paper", {**base, **kw})


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logged(run: Path) -> int:
    """Complete lines in metrics.jsonl (a line being written may be cut)."""
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def test_a_second_training_on_the_same_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "metagrad.cli", "train", "sinusoid", "--iterations", "1000000",
           "--no-progress", "--threads", "1", "--out", str(run)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.1)
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "in use" in second.stderr and str(first.pid) in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    # the first run's files are its own: config and a loadable checkpoint at its iteration
    state = ckpt.load(ckpt.CheckpointDir(run / "checkpoints").latest())
    assert state["config"]["iterations"] == 1_000_000
    assert records(run)[-1]["iteration"] <= state["iteration"]


def test_kills_at_random_moments_lose_nothing(tmp_path):
    """SIGKILL at 6 random moments, resuming after each: the latest checkpoint always loads,
    metrics.jsonl ends with exactly one record per iteration, no temporary files remain."""
    run = tmp_path / "run"
    total = 400
    base = [sys.executable, "-m", "metagrad.cli", "train", "sinusoid", "--no-progress",
            "--no-eval", "--threads", "1", "--out", str(run)]
    start = base + ["--iterations", str(total), "--checkpoint-every", "7", "--log-every", "1",
                    "--val-every", "1000", "--meta-batch", "5", "--baseline", "false"]
    rng = random.Random(0)
    for attempt in range(6):
        resume = ckpt.CheckpointDir(run / "checkpoints").latest() is not None
        lines = logged(run)
        proc = subprocess.Popen(base + ["--resume", "--iterations", str(total)] if resume
                                else start, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120  # until it trains (imports take long on a busy machine)
        while time.time() < deadline and proc.poll() is None and logged(run) <= lines:
            time.sleep(0.05)
        time.sleep(rng.random() * 0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        latest = ckpt.CheckpointDir(run / "checkpoints").latest()
        if latest is not None:
            assert ckpt.load(latest)["iteration"] > 0, attempt
    resumed = subprocess.run(base + ["--resume", "--iterations", str(total)], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    iterations = [r["iteration"] for r in records(run)]
    assert iterations == list(range(1, total + 1))
    seconds = [r["seconds"] for r in records(run)]
    assert seconds == sorted(seconds)  # cumulative across resumes
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert not leftovers
    history = [json.loads(line)["event"] for line in
               (run / "history.jsonl").read_text().splitlines()]
    assert history[0] == "start" and "resume" in history


def test_extending_a_cosine_run_follows_the_schedule_of_the_new_length(tmp_path):
    """Resumed with more iterations, the meta learning rate continues on the cosine of the new
    length (as a straight run of that length has it), instead of rising again."""
    cfg = dict(meta_lr_schedule="cosine", meta_lr=1e-3, min_meta_lr=1e-5)
    train(small(iterations=30, **cfg), tmp_path / "straight", progress=False)
    train(small(iterations=10, **cfg), tmp_path / "extended", progress=False)
    train(None, tmp_path / "extended", resume=True, iterations=30, progress=False)
    straight = {r["iteration"]: r["meta_lr"] for r in records(tmp_path / "straight")}
    extended = {r["iteration"]: r["meta_lr"] for r in records(tmp_path / "extended")}
    for t in range(11, 31):
        assert extended[t] == pytest.approx(straight[t], rel=1e-12), t
    assert straight[30] == pytest.approx(cosine_lr(29 / 30, 1e-3, 1e-5))
    assert extended[30] < extended[10]  # still annealing, never back up
    history = (tmp_path / "extended" / "history.jsonl").read_text()
    assert '"extended_from": 10' in history
    # the original configuration is kept; the extension is in the history and checkpoints
    assert "iterations: 10\n" in (tmp_path / "extended" / "config.yaml").read_text()


def test_a_time_limit_ends_the_run_validated_and_the_cosine_follows_the_time(tmp_path):
    """``minutes``: the run stops once its training time reaches the limit, long before its
    iterations, with that last iteration validated and saved; a cosine β anneals over the
    share of the time spent: each iteration's rate is cosine(seconds so far / limit)."""
    limit = 0.05
    run = train(small(iterations=10**6, minutes=limit, meta_lr_schedule="cosine", meta_lr=1e-3,
                      min_meta_lr=1e-5), tmp_path / "run", progress=False)
    assert 0 < run.iteration < 10**6 and run.seconds >= limit * 60
    lines = records(tmp_path / "run")
    assert lines[-1]["iteration"] == run.iteration and "val/mse" in lines[-1]
    state = ckpt.load(ckpt.CheckpointDir(tmp_path / "run" / "checkpoints").latest())
    assert state["iteration"] == run.iteration
    for before, now in itertools.pairwise(lines):  # seconds are logged to the millisecond
        expected = cosine_lr(before["seconds"] / (limit * 60), 1e-3, 1e-5)
        assert now["meta_lr"] == pytest.approx(expected, abs=2e-6), now["iteration"]
    assert lines[-1]["meta_lr"] < 5e-5 and lines[0]["meta_lr"] > 9.9e-4
    with pytest.raises(ConfigError, match="minutes"):
        small(minutes=0)


def test_a_time_limited_run_resumes_with_a_longer_limit(tmp_path):
    first = train(small(iterations=10**6, minutes=0.01), tmp_path / "run", progress=False)
    longer = train(None, tmp_path / "run", resume=True, minutes=0.03, progress=False)
    assert longer.iteration > first.iteration and longer.seconds >= 0.03 * 60
    history = [json.loads(line) for line in
               (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[0]["minutes"] == 0.01
    assert history[1]["minutes"] == 0.03 and history[1]["minutes_before"] == 0.01
    # the limit is kept: resumed again without a new one, the spent run trains no further
    again = train(None, tmp_path / "run", resume=True, progress=False)
    assert again.iteration == longer.iteration


def test_resuming_twice_keeps_the_extended_length(tmp_path):
    train(small(iterations=10), tmp_path / "run", progress=False)
    train(None, tmp_path / "run", resume=True, iterations=20, progress=False)
    again = train(None, tmp_path / "run", resume=True, progress=False)
    assert again.iteration == 20


def test_device_cpu_works_and_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "sinusoid", "--iterations", "3", "--device", "cpu", "--no-eval",
                 "--no-progress", "--out", str(tmp_path / "cpu")]) == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    code = main(["train", "sinusoid", "--iterations", "3", "--device", "cuda", "--no-eval",
                 "--out", str(tmp_path / "cuda")])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA" in err and "Traceback" not in err


def test_off_a_terminal_progress_is_plain_and_short(tmp_path):
    """A 600-iteration sinusoid run printed to a pipe logs under 8 KB (no carriage-return
    frames), with at least one plain progress line."""
    out = subprocess.run(
        [sys.executable, "-m", "metagrad.cli", "train", "sinusoid", "--iterations", "600",
         "--meta-batch", "5", "--val-every", "300", "--val-tasks", "10", "--no-eval",
         "--threads", "1", "--out", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert len(text.encode()) < 8192, len(text)
    assert "\r" not in text
    assert "600/600" in text and "it/s" in text


def test_history_records_the_command_lines_that_started_and_resumed_the_run(tmp_path):
    run = tmp_path / "run"
    start = ["train", "sinusoid", "--iterations", "2", "--meta-batch", "5", "--no-eval",
             "--threads", "1", "--out", str(run)]
    resume = ["train", "sinusoid", "--resume", "--iterations", "3", "--no-eval", "--out",
              str(run)]
    assert main(start) == 0 and main(resume) == 0
    events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "resume"]
    assert [e["command"] for e in events] == [" ".join(["metagrad", *start]),
                                              " ".join(["metagrad", *resume])]


def test_a_run_that_fails_to_start_leaves_no_directory_behind(tmp_path, capsys):
    """A start refused after the run directory was made (here: an environment that cannot be
    imported) removes the directories it made, parents included, and keeps one the user made."""
    made = tmp_path / "new" / "run"
    code = main(["train", "rl", "--env", "no_such_module:make", "--iterations", "1",
                 "--no-eval", "--out", str(made)])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_module" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["train", "rl", "--env", "no_such_module:make", "--iterations", "1",
                 "--no-eval", "--out", str(mine)]) == 2
    assert mine.is_dir()


def test_the_eta_of_a_time_limited_run_is_the_time_it_has_left(capsys):
    """Plain log lines: 10¹² iterations at any plausible rate would take far longer than the 65
    seconds a time limit leaves; the ETA says 1:05."""
    progress = Progress(10**12, 0, "task/algo", enabled=True, interval=0.0,
                        time_left=lambda: 65.0)
    progress.update({"loss/maml": 0.5})
    assert "ETA 1:05" in capsys.readouterr().out
    unlimited = Progress(10**12, 0, "task/algo", enabled=True, interval=0.0)
    unlimited.update({"loss/maml": 0.5})
    assert "ETA 1:05" not in capsys.readouterr().out
