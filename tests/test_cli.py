"""The command line: clear one-line errors with exit status 2, and a clean stop on SIGINT."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metagrad.cli import main
from metagrad.training import checkpoint as ckpt


@pytest.mark.parametrize("argv, message", [
    (["train", "sinusoid", "--inner-lrr", "0.1"], "Did you mean 'inner_lr'"),
    (["train", "sinusoid", "--max-kl", "0.5"], "belongs to meta-RL"),
    (["train", "sinusoid", "--imaml-lambda", "2"], "belongs to algorithm 'imaml'"),
    (["train", "sinusoid", "--device", "tpu"], "not a device"),
    (["train", "sinusoid", "--threads", "-1"], "threads must be an integer >= 1"),
    (["train", "sinusoid", "--min-meta-lr", "-1"], "min_meta_lr must be"),
    (["train", "sinusoid", "--meta-lr", "nan"], "meta_lr must be a finite number"),
    (["train", "sinusoid", "--algo", "mamlpp", "--iterations-per-epoch", "0"],
     "iterations_per_epoch"),
    (["train", "sinusoid", "--algo", "imaml", "--imaml-cg-iterations", "-1"],
     "imaml_cg_iterations"),
    (["train", "sinusoid", "--algo", "blackbox", "--first-order"], "first_order"),
    (["train", "sinusoid", "--algo", "no.such.module:Learner"], "cannot import"),
    (["train", "no.such.module:task"], "cannot import"),
    (["eval", "no/such/run", "--tasks", "-3"], "not a run directory"),
    (["train", "sinusoid", "--inner-lr", "-1"], "inner_lr must be a finite number > 0"),
    (["train", "sinusoid", "--inner-steps", "0"], "inner_steps must be an integer >= 1"),
    (["train", "sinusoid", "--meta-batch", "abc"], "cannot read 'abc'"),
    (["train", "sinusoid", "--preset", "papr"], "Did you mean 'paper'"),
    (["train", "sinusoid", "--batching", "vmapp"], "Did you mean 'vmap'"),
    (["train", "sinusoid", "--config", "missing.yaml"], "does not exist"),
    (["train", "sinusoid", "--resume"], "--resume needs --out"),
    (["eval", "no/such/run"], "not a run directory"),
])
def test_bad_input_gets_a_clear_message_and_exit_code(argv, message, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_misspelt_config_key_suggests_the_right_one(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inner_stpes: 3\n")
    assert main(["train", "sinusoid", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "Did you mean 'inner_steps'" in capsys.readouterr().err


def test_corrupt_checkpoint_is_refused_by_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--iterations", "5", "--no-eval", "--no-progress",
                 "--out", str(run)]) == 0
    latest = ckpt.CheckpointDir(run / "checkpoints").latest()
    latest.write_bytes(latest.read_bytes()[:100])
    assert main(["eval", str(run), "--checkpoint", "last"]) == 2
    assert "not a metagrad checkpoint" in capsys.readouterr().err


def test_sigint_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "metagrad.cli", "train", "sinusoid", "--iterations", "1000000",
           "--no-progress", "--threads", "1", "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by a signal" in out + err
    latest = ckpt.CheckpointDir(run / "checkpoints").latest()
    stopped_at = ckpt.load(latest)["iteration"]
    assert stopped_at >= 50  # metrics were written at iteration 50
    resumed = subprocess.run(cmd[:-2] + ["--out", str(run), "--resume", "--iterations",
                                         str(stopped_at + 3), "--no-eval"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    state = ckpt.load(ckpt.CheckpointDir(run / "checkpoints").latest())
    assert state["iteration"] == stopped_at + 3
    assert isinstance(state["learners"]["maml"]["model.head.weight"], torch.Tensor)


def test_package_has_a_console_script():
    assert (Path(sys.executable).parent / "metagrad").exists()


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


@pytest.mark.parametrize("argv, message", [
    (["train", "omniglot", "--data", "/no/such/dir"], "Omniglot not found"),
    (["train", "omniglot", "--ways", "10000", "--data", str(SHARED)], "ways"),
    (["train", "omniglot", "--shots", "15", "--queries", "10", "--data", str(SHARED)], "20"),
    (["train", "sinusoid", "--inner-lr", "1e9", "--iterations", "50"], "loss became"),
    (["train", "sinusoid", "--algo", "imamll"], "Did you mean 'imaml'"),
    (["train", "sinusoid", "--algo", "blackbox", "--precision", "bf16"],
     "blackbox cannot use precision='bf16'"),
    (["train", "sinusoid", "--precision", "fp16"], "CUDA"),
])
def test_data_and_training_mistakes_are_explained(argv, message, capsys, tmp_path):
    if "--data" in argv and argv[argv.index("--data") + 1] == str(SHARED) and not SHARED.is_dir():
        pytest.skip(f"Omniglot not found at {SHARED}")
    code = main([*argv, "--out", str(tmp_path / "run"), "--no-progress", "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_diverged_run_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--iterations", "4", "--checkpoint-every", "2",
                 "--no-eval", "--no-progress", "--out", str(run)]) == 0
    good = ckpt.CheckpointDir(run / "checkpoints").latest()
    state = ckpt.load(good)
    # poison the learned weights so that the loss is NaN on the next iteration
    state["learners"]["maml"]["model.head.bias"].fill_(float("nan"))
    ckpt.save(state, good)
    assert main(["train", "sinusoid", "--out", str(run), "--resume", "--iterations", "8",
                 "--no-progress"]) == 2
    assert "loss became nan at iteration 5" in capsys.readouterr().err
    assert ckpt.CheckpointDir(run / "checkpoints").latest() == good


KILL_WHILE_WRITING = """
import sys, torch
from metagrad.training import checkpoint as ckpt
directory = ckpt.CheckpointDir(sys.argv[1], keep=2)
big = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
i = 0
while True:
    i += 1
    directory.save({"iteration": i, "weights": big + i}, i)
    print(i, flush=True)
"""


def test_sigkill_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_WHILE_WRITING, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it complete a few checkpoints, then kill it mid-write
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    latest = ckpt.CheckpointDir(tmp_path).latest()
    state = ckpt.load(latest)
    big = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
    assert state["iteration"] >= 3
    assert torch.equal(state["weights"], big + state["iteration"])  # complete and consistent
