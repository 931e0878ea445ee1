"""The black-box baseline: a set model over the support pairs that predicts the query targets."""

import json

import pytest
import torch
import torch.nn.functional as F

from metagrad.algorithms.blackbox import BlackBox
from metagrad.cli import main
from metagrad.config import resolve
from metagrad.errors import ConfigError
from metagrad.models.conv import Conv4
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.sinusoid import SinusoidTasks
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import evaluation_curves
from metagrad.training.loop import train

DT = torch.float64


def regressor(seed=0, **kw):
    torch.manual_seed(seed)
    return BlackBox.from_model(sinusoid_mlp(), F.mse_loss, **kw).to(DT)


def classifier(ways=5, hidden=8, seed=0, **kw):
    torch.manual_seed(seed)
    return BlackBox.from_model(Conv4(1, ways, hidden=hidden), F.cross_entropy, classes=ways, **kw)


def sinusoid_batch(tasks=3, shots=6, queries=7, seed=0):
    return SinusoidTasks(shots, queries).sample(tasks, torch.Generator().manual_seed(seed)).to(
        dtype=DT)


def image_batch(tasks=2, ways=5, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return sx, sy, qx, qy


def test_output_shapes_and_the_head_is_replaced_by_attention():
    bb = regressor()
    b = sinusoid_batch()
    assert bb(b.support_x, b.support_y, b.query_x).shape == (3, 7, 1)
    assert isinstance(bb.encoder.head, torch.nn.Identity)
    cls = classifier()
    sx, sy, qx, qy = image_batch()
    assert cls(sx, sy, qx).shape == (2, 15, 5)
    assert cls.meta_loss(sx, sy, qx, qy).shape == ()


def test_a_query_prediction_does_not_depend_on_the_other_queries():
    """Queries attend to the support set only; with BatchNorm (Conv4) this holds in eval mode."""
    b = sinusoid_batch(queries=9)
    bb = regressor()
    full = bb(b.support_x, b.support_y, b.query_x)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bb(b.support_x, b.support_y, b.query_x[:, perm]), full[:, perm])
    torch.testing.assert_close(bb(b.support_x, b.support_y, b.query_x[:, :2]), full[:, :2])
    torch.testing.assert_close(bb(b.support_x, b.support_y, b.query_x[:, 4:5]), full[:, 4:5])

    cls = classifier()
    cls.train()
    cls.meta_gradient(__import__("metagrad").TaskBatch(*image_batch()))  # running statistics move
    sx, sy, qx, _ = image_batch()
    full = cls.predict(sx, sy, qx)
    assert cls.training  # predict restores the mode
    torch.testing.assert_close(cls.predict(sx, sy, qx[:, 3:4]), full[:, 3:4])
    torch.testing.assert_close(cls.predict(sx, sy, qx.flip(1)), full.flip(1))


def test_predictions_are_invariant_to_the_support_order_but_read_the_labels():
    b = sinusoid_batch(shots=8)
    bb = regressor()
    full = bb(b.support_x, b.support_y, b.query_x)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(bb(b.support_x[:, perm], b.support_y[:, perm], b.query_x), full)
    changed = bb(b.support_x, b.support_y + 1.0, b.query_x)
    assert (changed - full).abs().max() > 1e-3  # the support targets matter

    cls = classifier()
    sx, sy, qx, _ = image_batch()
    full = cls.predict(sx, sy, qx)
    perm = torch.randperm(sx.shape[1], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cls.predict(sx[:, perm], sy[:, perm], qx), full)
    # relabelling the support set (a permutation of the classes) changes the logits
    assert (cls.predict(sx, (sy + 1) % 5, qx) - full).abs().max() > 1e-4


def test_bad_inputs_get_clear_errors():
    bb = regressor()
    b = sinusoid_batch()
    with pytest.raises(ConfigError, match="regression targets"):
        bb(b.support_x, b.support_y[..., 0], b.query_x)
    cls = classifier()
    sx, sy, qx, _ = image_batch()
    with pytest.raises(ConfigError, match="labels must lie in 0..4"):
        cls(sx, sy + 5, qx)
    with pytest.raises(ConfigError, match="divisible"):
        BlackBox(torch.nn.Identity(), 3, F.mse_loss, width=30, heads=4)
    with pytest.raises(ConfigError, match="head"):
        BlackBox.from_model(torch.nn.Identity(), F.mse_loss)


def test_short_training_on_sinusoid_beats_the_zero_predictor_clearly():
    """~5 s: 400 iterations of meta-batch 25 (K = 10) bring the 10-shot test MSE well below the
    zero predictor's (the mean of A² sin², about 4.2) and below the untrained model's."""
    torch.manual_seed(0)
    bb = BlackBox.from_model(sinusoid_mlp(), F.mse_loss, width=64)
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    tasks, g = SinusoidTasks(10, 10), torch.Generator().manual_seed(0)
    test = SinusoidTasks(10, 50)

    def test_mse():
        curves = evaluation_curves(bb, test, 200, 10, "mse", torch.Generator().manual_seed(5))
        assert curves.shape == (200, 1)  # no gradient steps: one column, at 0 steps
        return curves.mean().item()

    untrained = test_mse()
    for _ in range(400):
        opt.zero_grad()
        bb.meta_gradient(tasks.sample(25, g))
        opt.step()
    ref = test.sample(200, torch.Generator().manual_seed(5))
    zero = ref.query_y.pow(2).mean().item()
    trained = test_mse()
    assert trained < 0.3 * zero and trained < 0.3 * untrained, (trained, zero, untrained)


def test_short_training_on_synthetic_five_way_gets_far_above_chance():
    """~3 s: Omniglot-like 5-way 1-shot episodes (each class a random blocky 28×28 binary
    prototype, its items copies with 10% of the pixels flipped; labels permuted per episode) with
    a small Conv4: on held-out classes, query accuracy far above the 20% of chance, which needs
    reading the support labels (measured 0.93 after 150 iterations)."""
    g = torch.Generator().manual_seed(0)
    protos = (torch.rand(230, 1, 1, 7, 7, generator=g) > 0.6).repeat_interleave(4, -1)
    protos = protos.repeat_interleave(4, -2)
    flips = torch.rand(230, 8, 1, 28, 28, generator=g) < 0.1
    images = (protos ^ flips).to(torch.uint8) * 255
    train_eps = EpisodeSampler(images[:200], ways=5, shots=1, queries=2)
    test_eps = EpisodeSampler(images[200:], ways=5, shots=1, queries=5)
    cls = classifier(hidden=16, width=64)
    test_acc = lambda: evaluation_curves(  # noqa: E731
        cls, test_eps, 100, 3, "accuracy", torch.Generator().manual_seed(1))
    before = test_acc()
    assert before.shape == (100, 1)  # no gradient steps: one column, at 0 steps
    opt = torch.optim.Adam(cls.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        cls.meta_gradient(train_eps.sample(8, g))
        opt.step()
    after = test_acc().mean().item()
    assert before.mean() < 0.35 and after > 0.7, (before.mean(), after)


@pytest.mark.parametrize("flag, value, message", [
    ("first_order", True, "first_order does not apply"),
    ("learn_inner_lr", True, "no inner rate"),
    ("compile", True, "not blackbox"),
    ("batching", "loop", "batching='loop' does not apply"),
    ("blackbox_heads", 3, "divisible"),
])
def test_inner_loop_settings_are_refused(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve("sinusoid", "paper", {"algo": "blackbox", flag: value})
    resolve("omniglot", None, {"algo": "blackbox", "ways": 20})  # presets' inner settings: ignored


def small(**kw):
    base = dict(algo="blackbox", iterations=30, val_every=15, checkpoint_every=10, eval_tasks=20,
                eval_steps=3, log_every=10, val_tasks=10, blackbox_width=32, threads=1)
    return resolve("sinusoid", "paper", {**base, **kw})


def test_resume_is_bit_identical(tmp_path):
    full = train(small(), tmp_path / "full", progress=False)
    train(small(iterations=20), tmp_path / "split", progress=False)
    resumed = train(None, tmp_path / "split", resume=True, iterations=30, progress=False)
    a, b = (t.exp.learners["blackbox"].state_dict() for t in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(full.exp.learners) == {"blackbox", "pretrained"}


def test_cli_train_then_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "sinusoid", "--algo", "blackbox", "--iterations", "20",
                 "--val-every", "10", "--eval-tasks", "20", "--eval-steps", "3",
                 "--eval-shots", "5", "--blackbox-width", "32", "--threads", "1", "--no-eval",
                 "--no-progress", "--out", str(run)]) == 0
    state = ckpt.load(ckpt.CheckpointDir(run / "checkpoints").latest())
    assert state["iteration"] == 20 and "blackbox" in state["learners"]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "blackbox takes no gradient steps" in out
    rows = json.loads((run / "eval.json").read_text())["results"]
    steps = {m: sorted(r["steps"] for r in rows if r["method"] == m)
             for m in ("blackbox", "pretrained", "scratch")}
    assert steps == {"blackbox": [0], "pretrained": [0, 1, 2, 3], "scratch": [0, 1, 2, 3]}
    assert (run / "sinusoid_predictions_K5.png").stat().st_size > 10_000
