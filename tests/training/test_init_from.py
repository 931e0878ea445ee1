"""``init_from``: a new run starts its learners' weights from another run's checkpoint (fresh
optimizer, schedule, counters and task stream), for supervised and meta-RL runs; what does not fit
is refused with a one-line error before anything is trained."""

import json
from pathlib import Path

import pytest
import torch

from metagrad.cli import main
from metagrad.config import resolve
from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError
from metagrad.rl.settings import RLConfig
from metagrad.training import checkpoint as ckpt
from metagrad.training.loop import make_job, train
from metagrad.training.run import RunDirectory


def sinusoid(**kw):
    base = dict(iterations=300, val_every=100, checkpoint_every=100, eval_tasks=10, eval_steps=1,
                log_every=1, val_tasks=10, meta_batch=5, baseline=False, threads=1)
    return resolve("sinusoid", "paper", {**base, **kw})


def rl(**kw) -> RLConfig:
    base = dict(meta_batch=3, rollouts=3, horizon=20, hidden=(16,), iterations=2,
                checkpoint_every=2, val_every=2, val_tasks=2, eval_steps=1)
    return RLConfig(**{**base, **kw})


def first_record(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("init") / "trained"
    train(sinusoid(), run, progress=False)
    return run


def test_validation_tasks_do_not_depend_on_the_training_seed(trained, tmp_path):
    """Runs with different seeds select and compare their checkpoints on the same tasks: the same
    weights validate to the same value whatever the seed, and that value is not a constant."""
    _, state = ckpt.read_start(trained)
    values = []
    for seed in (0, 7):
        job = make_job(sinusoid(seed=seed), RunDirectory(tmp_path / f"s{seed}"), Distributed(),
                       torch.device("cpu"))
        values.append(job.validate())
        job.initialise_from(state)
        values.append(job.validate())
    untrained_0, trained_0, untrained_7, trained_7 = values
    assert trained_7 == trained_0
    assert untrained_7 != untrained_0  # the seed does change the initial weights
    assert trained_0 < untrained_0  # validation measures the weights: training lowered the MSE


def test_the_learners_start_from_the_best_checkpoint_with_a_fresh_optimizer(trained, tmp_path):
    path, state = ckpt.read_start(trained)
    assert path.name == "best.safetensors"
    cfg = sinusoid(init_from=str(trained))
    job = make_job(cfg, RunDirectory(tmp_path / "new"), Distributed(), torch.device("cpu"))
    fresh = {k: v.clone() for k, v in job.learners["maml"].state_dict().items()}
    job.initialise_from(state)
    saved = state["learners"]["maml"]
    loaded = job.learners["maml"].state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved)  # it did change something
    assert job.optimizers["maml"].state_dict()["state"] == {}
    # a checkpoint file is taken as it is
    path, _ = ckpt.read_start(ckpt.CheckpointDir(trained / "checkpoints").latest())
    assert path.name == "ckpt-0000300.safetensors"


def test_a_run_started_from_a_trained_one_begins_where_it_ended(trained, tmp_path):
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    train(sinusoid(iterations=1, init_from=str(trained)), warm, progress=False)
    train(sinusoid(iterations=1), cold, progress=False)
    # the same seed draws the same first task batch: only the starting weights differ
    assert first_record(warm)["loss/maml"] < 0.7 * first_record(cold)["loss/maml"]
    start = json.loads((warm / "history.jsonl").read_text().splitlines()[0])
    assert start["init_from"].endswith("best.safetensors") and start["init_iteration"] == 300
    assert first_record(warm)["iteration"] == 1


def test_a_resumed_run_continues_from_its_own_checkpoint(trained, tmp_path):
    run = tmp_path / "run"
    train(sinusoid(iterations=2, checkpoint_every=1, init_from=str(trained)), run,
          progress=False)
    own = ckpt.CheckpointDir(run / "checkpoints").latest_state()
    resumed = train(None, run, resume=True, iterations=3, progress=False)
    assert resumed.iteration == 3
    assert own["iteration"] == 2
    events = [json.loads(line)["event"] for line in (run / "history.jsonl").read_text()
              .splitlines()]
    assert events == ["start", "resume"]


@pytest.mark.parametrize("change, message", [
    (dict(algo="metasgd"), "holds no 'metasgd' learner"),
    (dict(baseline=True), "holds no 'pretrained' learner"),
    (dict(learn_inner_lr=True), "'maml' learner does not fit this run's model"),
])
def test_a_checkpoint_that_does_not_fit_is_refused(trained, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        train(sinusoid(init_from=str(trained), **change), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_sources_are_clear_errors_on_the_command_line(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, message in ((tmp_path / "nowhere", "does not exist"),
                            (empty, "holds no checkpoint")):
        code = main(["train", "sinusoid", "--iterations", "1", "--init-from", str(source),
                     "--out", str(tmp_path / "out"), "--no-eval"])
        err = capsys.readouterr().err
        assert code == 2 and "init_from" in err and message in err, err
        assert "Traceback" not in err


def test_meta_rl_starts_its_policies_from_another_run(tmp_path):
    torch.set_num_threads(1)
    first = tmp_path / "first"
    train(rl(), first, progress=False)
    _, state = ckpt.read_start(first)
    job = make_job(rl(init_from=str(first)), RunDirectory(tmp_path / "second"), Distributed(),
                   torch.device("cpu"))
    generator = job.learners["maml"].generator.get_state()
    job.initialise_from(state)
    for name in ("maml", "pretrained"):
        saved = state["learners"][name]["policy"]
        loaded = job.learners[name].policy.state_dict()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # the task stream and counters start afresh
    assert torch.equal(job.learners["maml"].generator.get_state(), generator)
    assert job.learners["maml"].iteration == 0
    with pytest.raises(CheckpointError, match="hidden"):
        train(rl(hidden=(8,), init_from=str(first)), tmp_path / "third", progress=False)
