"""torchrun with 2 processes (gloo, CPU) gives the parameters of one process with the same seed."""

import os
import subprocess
import sys

import torch

from metagrad.training import checkpoint as ckpt

ARGS = ["train", "sinusoid", "--iterations", "12", "--meta-batch", "10", "--val-every", "1000",
        "--checkpoint-every", "1000", "--no-eval", "--no-progress", "--threads", "1",
        "--baseline", "true"]


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_processes_match_one(tmp_path):
    run([sys.executable, "-m", "metagrad.cli", *ARGS, "--out", str(tmp_path / "one")], tmp_path)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "metagrad.cli", *ARGS, "--out", str(tmp_path / "two")], tmp_path)
    one = ckpt.load(ckpt.CheckpointDir(tmp_path / "one" / "checkpoints").latest())
    two = ckpt.load(ckpt.CheckpointDir(tmp_path / "two" / "checkpoints").latest())
    assert one["iteration"] == two["iteration"] == 12
    for learner in ("maml", "pretrained"):
        for name, value in one["learners"][learner].items():
            torch.testing.assert_close(two["learners"][learner][name], value, rtol=1e-5, atol=1e-6)
    # metrics are written once (by rank 0)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"iteration": 12' in lines[0]


def test_two_processes_train_rl_in_step(tmp_path):
    """Each process samples and differentiates its half of the tasks; the TRPO step combines the
    halves, so both processes hold the same policy (checked by the trainer at every checkpoint,
    which raises otherwise) and rank 0 alone writes."""
    args = ["train", "rl", "--env", "navigation2d", "--meta-batch", "4", "--rollouts", "4",
            "--horizon", "20", "--hidden", "16", "--iterations", "3", "--baseline", "false",
            "--checkpoint-every", "1", "--no-eval", "--no-progress", "--threads", "1",
            "--fvp-fraction", "0.5", "--out", str(tmp_path / "rl")]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "metagrad.cli", *args], tmp_path)
    state = ckpt.load(ckpt.CheckpointDir(tmp_path / "rl" / "checkpoints").latest())
    assert state["iteration"] == 3
    lines = (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
