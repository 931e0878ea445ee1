"""Sinusoid regression end to end: learning, exact resume, checkpoints, evaluation output."""

import json
import pickle

import pytest
import torch

from metagrad.config import resolve
from metagrad.errors import CheckpointError
from metagrad.training import checkpoint as ckpt
from metagrad.training.loop import train
from metagrad.training.report import evaluate_run


def small(**kw):
    base = dict(iterations=40, val_every=1000, checkpoint_every=20, eval_tasks=50, eval_steps=3,
                log_every=10, val_tasks=20)
    return resolve("sinusoid", "paper", {**base, **kw})


def final_params(trainer):
    return {f"{n}/{k}": v.detach().clone()
            for n, learner in trainer.job.learners.items() for k, v in learner.state_dict().items()}


def test_resumed_run_is_bit_identical_to_uninterrupted(tmp_path):
    full = train(small(iterations=40), tmp_path / "full", progress=False)
    train(small(iterations=20), tmp_path / "split", progress=False)
    resumed = train(None, tmp_path / "split", resume=True, iterations=40, progress=False)
    a, b = final_params(full), final_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the run really moved away from its initialisation
    fresh = train(small(iterations=1), tmp_path / "one", progress=False)
    assert not torch.equal(final_params(fresh)["maml/model.head.weight"], a["maml/model.head.weight"])


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    train(small(iterations=20), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="--resume"):
        train(small(iterations=20), tmp_path / "run", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="config.yaml"):
        train(None, tmp_path / "empty", resume=True)


def test_short_training_adapts_and_beats_pretrained_baseline(tmp_path):
    """~10 s: MAML's post-update MSE falls well below its pre-update MSE and below the
    pretrained baseline fine-tuned the same way (the paper's Fig. 3 ordering)."""
    cfg = small(iterations=2500, eval_tasks=300, eval_steps=10, checkpoint_every=2500,
                eval_shots=[10], threads=1)
    train(cfg, tmp_path / "run", progress=False)
    rows, figures = evaluate_run(tmp_path / "run", scratch=False)
    mse = {(r.method, r.steps): r.mean for r in rows}
    assert mse[("maml", 1)] < 0.6 * mse[("maml", 0)]
    assert mse[("maml", 10)] < 0.5 * mse[("pretrained", 10)]
    assert mse[("maml", 10)] < mse[("maml", 1)]
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert data["metric"] == "mse"
    row = data["results"][0]
    assert set(row) == {"method", "shots", "steps", "mean", "ci95", "tasks", "split"}
    assert row["tasks"] == 300 and row["split"] == "test"
    assert all(f.is_file() and f.stat().st_size > 10_000 for f in figures)


def test_checkpoint_round_trip_and_pickle_refused(tmp_path):
    state = {"a": torch.arange(5), "nested": {"b": [1, 2.5, "x", None], 3: torch.ones(2, 2)},
             "rng": ckpt.rng_state(torch.Generator().manual_seed(3))}
    path = ckpt.save(state, tmp_path / "c.safetensors")
    back = ckpt.load(path)
    assert torch.equal(back["a"], state["a"]) and back["nested"]["b"] == [1, 2.5, "x", None]
    assert torch.equal(back["nested"][3], torch.ones(2, 2))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load(bad)
    torch.save({"x": torch.ones(1)}, tmp_path / "torch.pt")
    with pytest.raises(CheckpointError):
        ckpt.load(tmp_path / "torch.pt")
    assert not marker.exists()
