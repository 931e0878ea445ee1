"""Bad inputs, one row per kind: the Python API raises a MetagradError, the command line exits
with status 2 and one line without a traceback, and either message names the setting at fault.
(The CLI's flag mistakes already covered by tests/test_cli.py are not repeated here.)"""

import re
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metagrad import IMAML, MAML, BlackBox, MetagradError, Reptile, TaskBatch
from metagrad.cli import main
from metagrad.config import resolve
from metagrad.models.mlp import MLP
from metagrad.rl import MAMLRL, RLConfig
from metagrad.training.loop import train
from metagrad.training.report import evaluate_run

TINY = dict(iterations=3, val_every=1000, checkpoint_every=3, eval_tasks=4, eval_steps=1,
            val_tasks=2, meta_batch=2, baseline=False, threads=1)


def mlp(features: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return MLP([features, 8, 1])


def frozen() -> nn.Module:
    model = mlp()
    model.requires_grad_(False)
    return model


def layernorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))


def batch(tasks: int = 2, examples: int = 5, target_shape: tuple = (1,)) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, examples, 1, generator=g)
    y = torch.randn(tasks, examples, *target_shape, generator=g)
    return TaskBatch(x, y, x, y)


def float64_batch() -> TaskBatch:
    return TaskBatch(*(t.double() for t in batch().tensors()))


ONE_TASK_X, ONE_TASK_Y = torch.randn(5, 3), torch.randn(5, 1)
API = [
    pytest.param(lambda: MAML(mlp(3), F.mse_loss).meta_gradient(
        TaskBatch(ONE_TASK_X, ONE_TASK_Y, ONE_TASK_X, ONE_TASK_Y)), "task dimension",
        id="one task without a task dimension"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).meta_gradient(
        TaskBatch(ONE_TASK_Y, ONE_TASK_Y, ONE_TASK_Y, ONE_TASK_Y)), "task dimension",
        id="one scalar-feature task without a task dimension"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).meta_gradient(batch(target_shape=())),
                 "broadcast", id="targets that would broadcast (meta-training)"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).adapt(torch.randn(5, 1), torch.randn(5)),
                 "broadcast", id="targets that would broadcast (adapt)"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss, inner_lr="fast"), "inner_lr",
                 id="non-numeric inner_lr"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss, inner_lr=float("nan")), "inner_lr",
                 id="nan inner_lr"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss, inner_lr=float("inf")), "inner_lr",
                 id="infinite inner_lr"),
    pytest.param(lambda: resolve("sinusoid", None, {"meta_lr": "fast"}), "meta_lr",
                 id="non-numeric meta_lr"),
    pytest.param(lambda: resolve("sinusoid", None, {"meta_lr": "inf"}), "meta_lr",
                 id="infinite meta_lr"),
    pytest.param(lambda: MAML(frozen(), F.mse_loss), "requires_grad",
                 id="nothing to adapt: all frozen"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss, adapt=lambda name, p: False), "adapt",
                 id="nothing to adapt: adapt selects none"),
    pytest.param(lambda: MAML(layernorm(), F.mse_loss, batching="vmap").meta_gradient(batch()),
                 "batching='vmap'", id="forced vmap through LayerNorm, second order"),
    pytest.param(lambda: MAML(mlp(), "mse"), "loss_fn must be a function",
                 id="a loss that is not callable"),
    pytest.param(lambda: BlackBox(mlp(), 8, None), "loss_fn must be a function",
                 id="a black box without a loss"),
    pytest.param(lambda: MAML(mlp(), lambda out, y: (out - y) ** 2).meta_gradient(batch()),
                 "scalar tensor", id="a per-example loss (meta-training, tasks vmapped)"),
    pytest.param(lambda: MAML(mlp(), lambda out, y: (out - y) ** 2, batching="loop").adapt(
        torch.randn(5, 1), torch.randn(5, 1)), "scalar tensor", id="a per-example loss (adapt)"),
    pytest.param(lambda: RLConfig(max_kl=0).validate(), "max_kl must be a finite number > 0",
                 id="a float setting given an integer out of range is named a number"),
    pytest.param(lambda: RLConfig(hidden=(0,)).validate(), "hidden must be an integer >= 1",
                 id="an integer list setting out of range is named an integer"),
    pytest.param(lambda: RLConfig(method="rl2", first_order=True), "first_order does not apply",
                 id="first_order with RL²"),
    pytest.param(lambda: RLConfig(rl2_episodes=3), "rl2_episodes=3 applies to method rl2 only",
                 id="rl2_episodes without RL²"),
    pytest.param(lambda: MAMLRL(RLConfig(meta_batch=2), env=object()),
                 "lacks obs_dim, act_dim, horizon, sample_tasks", id="an object as environment"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).meta_gradient([batch()]), "expected a TaskBatch",
                 id="a list instead of a TaskBatch"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).evaluation_curve(
        batch().tensors(), 1, F.mse_loss), "expected a TaskBatch",
                 id="a tuple of tensors instead of a TaskBatch"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).meta_gradient(float64_batch()),
                 "parameters are float32: convert", id="float64 data (meta-training)"),
    pytest.param(lambda: MAML(mlp(), F.mse_loss).evaluation_curve(float64_batch(), 1, F.mse_loss),
                 "parameters are float32: convert", id="float64 data (evaluation)"),
    pytest.param(lambda: Reptile(mlp(), F.mse_loss).meta_gradient(float64_batch()),
                 "parameters are float32: convert", id="float64 data (Reptile)"),
    pytest.param(lambda: MAML(mlp(3), F.mse_loss).adapt(torch.randn(5, 2), torch.randn(5, 1)),
                 "could not process the inputs (5, 2) float32", id="an input size (adapt)"),
    pytest.param(lambda: IMAML(mlp(3), F.mse_loss).evaluation_curve(batch(), 1, F.mse_loss),
                 "could not process the inputs (5, 1) float32", id="an input size (iMAML)"),
    pytest.param(lambda: MAML(MLP([1, 8, 3]), F.cross_entropy).meta_gradient(batch(
        target_shape=())), "class-index targets must be integers", id="float class targets"),
    pytest.param(lambda: MAML(mlp().to("meta"), F.mse_loss).adapt(torch.randn(5, 1),
                                                              torch.randn(5, 1)),
                 "parameters are on meta: move the data there", id="data on another device"),
    pytest.param(lambda: BlackBox.from_model(MLP([1, 8, 1]), F.mse_loss).meta_gradient(
        float64_batch()), "parameters are float32: convert", id="float64 data (black box)"),
]


@pytest.mark.parametrize("call, message", API)
def test_python_api_refuses_with_a_metagrad_error(call, message):
    with pytest.raises(MetagradError, match=re.escape(message)):
        call()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny sinusoid runs: MAML and Meta-SGD."""
    base = tmp_path_factory.mktemp("runs")
    train(resolve("sinusoid", "paper", TINY), base / "maml", progress=False)
    train(resolve("sinusoid", "paper", {**TINY, "algo": "metasgd"}), base / "metasgd",
          progress=False)
    return base


def copy_run(runs, name, tmp_path):
    return shutil.copytree(runs / name, tmp_path / name)


def test_checkpoint_of_another_algorithm_under_evaluate_run(runs, tmp_path):
    run = copy_run(runs, "metasgd", tmp_path)
    foreign = next((runs / "maml" / "checkpoints").glob("ckpt-*"))
    for mine in (run / "checkpoints").glob("*.safetensors"):
        shutil.copy(foreign, mine)
    with pytest.raises(MetagradError, match="another task, algorithm or model"):
        evaluate_run(run, which="last", out=tmp_path / "eval")


@pytest.mark.parametrize("damage, message", [
    ("iterations: [\n  3", "config.yaml is damaged"),
    ("\x00\x01binary", "config.yaml"),
    ("- a list\n- of things\n", "config.yaml"),
    ("iterations: 3\nalgo: maml\nbogus_setting: 4\n", "bogus_setting"),
])
def test_damaged_run_config_under_evaluate_run_and_eval(runs, tmp_path, capsys, damage, message):
    run = copy_run(runs, "maml", tmp_path)
    (run / "config.yaml").write_text(damage)
    with pytest.raises(MetagradError, match=message):
        evaluate_run(run, which="last", out=tmp_path / "eval")
    assert main(["eval", str(run), "--checkpoint", "last", "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["train", "sinusoid", "--config", "{binary}"], "config file"),
    (["train", "sinusoid", "--iterations", "2", "--out", "{file}"], "--out"),
    (["train", "sinusoid", "--iterations", "2", "--out", "{file}/run"], "--out"),
    (["eval", "{maml}", "--tasks", "-3"], "--tasks"),
    (["eval", "{maml}", "--steps", "-1"], "--steps"),
    (["eval", "{maml}", "--out", "{file}"], "--out"),
    (["eval", "{maml}", "--out", "{file}/eval"], "--out"),
    (["eval", "{maml}", "--report-steps", "0", "2"], "strictly increasing integers"),
    (["eval", "{maml}", "--report-steps", "1", "0"], "strictly increasing integers"),
], ids=["binary --config", "--out is a file", "--out below a file", "eval --tasks -3",
        "eval --steps -1", "eval --out is a file", "eval --out below a file",
        "eval --report-steps beyond --steps", "eval --report-steps decreasing"])
def test_cli_refuses_with_exit_2_and_one_line(runs, tmp_path, capsys, monkeypatch, argv,
                                              message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "file").write_text("not a directory")
    paths = {"binary": tmp_path / "binary.yaml", "file": tmp_path / "file",
             "maml": runs / "maml"}
    code, err = cli([a.format(**paths) for a in argv] + ["--no-progress", "--no-eval"]
                    if argv[0] == "train" else [a.format(**paths) for a in argv], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not list((runs / "maml").glob("eval-*"))  # nothing was evaluated
