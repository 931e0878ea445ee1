"""torchrun with 2 processes (gloo, CPU): the all-reduced meta-gradients and losses are those of
one process on the whole batch, with an uneven split (5 tasks on 2 processes: 2 + 3); the trainer
then ends with the same parameters as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from metagrad.algorithms.maml import MAML
from metagrad.algorithms.mamlpp import MAMLpp
from metagrad.models.mlp import MLP
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TASKS = 5
ARGS = ["train", "sinusoid", "--iterations", "12", "--meta-batch", str(TASKS), "--val-every",
        "1000", "--checkpoint-every", "1000", "--no-eval", "--no-progress", "--threads", "1",
        "--baseline", "true"]

# Run by each torchrun process: the trainer's gradient exchange (Distributed.shard, share,
# all_reduce) on a fixed batch, for two learners reduced in one all-reduce as the trainer does.
WORKER = """
import os
import sys
import torch
import metagrad
from metagrad.distributed import Distributed
from test_distributed import learners, reference_batch

dist = Distributed.from_environment()
import torch._dynamo  # as the trainer's optimizers and torch.func import it: after the group exists
batch = reference_batch()
mine = dist.shard(batch)
models = learners()
losses = torch.stack([m.meta_gradient(mine) for m in models])
reduced = dist.all_reduce(models, dist.share(batch), losses)
part = dist.part(batch.num_tasks)
dist.close()
torch.save({"package": metagrad.__file__, "part": [part.start, part.stop], "local": losses.detach(), "loss": reduced,
            "grads": [[p.grad for p in m.parameters()] for m in models],
            "threads_after_close": len(os.listdir("/proc/self/task"))},
           f"{sys.argv[1]}/rank{dist.rank}.pt")
"""


def learners():
    """A MAML and a MAML++ (learned per-step rates: a second parameter module), float64."""
    torch.manual_seed(0)
    maml = MAML(MLP([1, 16, 16, 1]).to(torch.float64), F.mse_loss, inner_lr=0.01, inner_steps=2)
    torch.manual_seed(1)
    pp = MAMLpp(MLP([1, 16, 16, 1]).to(torch.float64), F.mse_loss, inner_lr=0.01,
                inner_steps=3)
    return [maml, pp]


def reference_batch():
    batch = SinusoidTasks(shots=5, queries=7).sample(TASKS, torch.Generator().manual_seed(3))
    return batch.to(dtype=torch.float64)


def run(cmd, tmp_path):
    # PYTHONPATH: the subprocesses import this checkout's metagrad (and these tests), not the one
    # the virtualenv's editable install points at
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_all_reduced_meta_gradients_match_one_process_on_an_uneven_split(tmp_path):
    models = learners()
    batch = reference_batch()
    ref_losses = torch.stack([m.meta_gradient(batch) for m in models])
    ref_grads = [[p.grad for p in m.parameters()] for m in models]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(Path(r["package"]).is_relative_to(ROOT) for r in ranks)  # this checkout's code
    assert [r["part"] for r in ranks] == [[0, 2], [2, 5]]  # uneven: 2 + 3 tasks
    # each rank's local loss is the mean over its own tasks only (a wrong shard shows here)
    for r in ranks:
        start, stop = r["part"]
        own = torch.stack([m.meta_loss(*batch[start:stop].tensors()) for m in learners()])
        torch.testing.assert_close(r["local"], own.detach(), rtol=1e-12, atol=0)
    for r in ranks:
        torch.testing.assert_close(r["loss"], ref_losses.detach(), rtol=1e-12, atol=0)
        for got_model, ref_model in zip(r["grads"], ref_grads, strict=True):
            assert len(got_model) == len(ref_model)
            for got, ref in zip(got_model, ref_model, strict=True):
                torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    # an equal-weight average of the two ranks' means (the classic mistake) would differ
    naive = (ranks[0]["local"] + ranks[1]["local"]) / 2
    assert not torch.allclose(naive, ref_losses.detach(), rtol=1e-6)
    # close() ends gloo's worker threads while the interpreter lives: one left running may release
    # its last work during teardown and abort the process (SIGABRT, "terminate called ...")
    assert [r["threads_after_close"] for r in ranks] == [1, 1]


def test_two_processes_match_one(tmp_path):
    """End to end through the CLI, also with an uneven split of the meta-batch."""
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


def test_two_processes_stop_together_at_a_time_limit(tmp_path):
    """With ``--minutes`` each process measures its own time; they agree on the largest, so
    both schedule the same cosine β (else their parameters would part, which the checkpoint
    after every iteration refuses) and stop after the same iteration, validated and saved."""
    args = ["train", "sinusoid", "--iterations", "1000000", "--minutes", "0.03",
            "--meta-lr-schedule", "cosine", "--meta-batch", str(TASKS), "--val-every", "1000",
            "--checkpoint-every", "1", "--no-eval", "--no-progress", "--threads", "1",
            "--baseline", "false", "--out", str(tmp_path / "run")]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "metagrad.cli", *args], tmp_path)
    state = ckpt.load(ckpt.CheckpointDir(tmp_path / "run" / "checkpoints").latest())
    assert 0 < state["iteration"] < 1_000_000 and state["seconds"] >= 0.03 * 60
    last = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert f'"iteration": {state["iteration"]},' in last and '"val/mse"' in last
