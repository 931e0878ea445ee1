"""Extending metagrad from outside: a toy algorithm and a toy task (whose model takes two
inputs) defined in this file, registered nowhere, trained and evaluated through the CLI by their
import paths."""

import dataclasses
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metagrad import MAML, TaskBatch
from metagrad.cli import build_parser, main
from metagrad.tasks import TaskSetup, task


@dataclass
class ScaledStepOptions:
    toy_step_scale: float = field(default=1.0, metadata={"help": "multiplies inner_lr"})


class ScaledStepMAML(MAML):
    """The toy algorithm: MAML whose inner step size is ``inner_lr · toy_step_scale``."""

    Options = ScaledStepOptions

    @classmethod
    def from_config(cls, model, loss_fn, settings, options=None):
        options = options or ScaledStepOptions()
        scaled = dataclasses.replace(settings, inner_lr=settings.inner_lr * options.toy_step_scale)
        return super().from_config(model, loss_fn, scaled, options)


class TwoInputLines:
    """Tasks y = a·x + b·z with (a, b) uniform in ±slope; inputs are the pair (x, z)."""

    def __init__(self, shots: int, queries: int, slope: float) -> None:
        self.shots, self.queries, self.slope = shots, queries, slope

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        n = self.shots + self.queries
        a, b = (torch.rand(2, num_tasks, 1, 1, generator=generator) * 2 - 1) * self.slope
        x = torch.rand(num_tasks, n, 1, generator=generator) * 2 - 1
        z = torch.rand(num_tasks, n, 1, generator=generator) * 2 - 1
        y = a * x + b * z
        s = self.shots
        return TaskBatch((x[:, :s], z[:, :s]), y[:, :s], (x[:, s:], z[:, s:]), y[:, s:])


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, z], dim=-1))


@dataclass
class LinesOptions:
    toy_slope: float = field(default=1.0, metadata={"help": "largest |slope|", "above": 0})


@task(options=LinesOptions)
def two_input_lines(config) -> TaskSetup:
    slope = config.task_options.toy_slope
    queries = config.eval_queries or config.queries
    return TaskSetup(train=TwoInputLines(config.shots, config.queries, slope),
                     held_out=lambda split, shots: TwoInputLines(shots, queries, slope),
                     metric="mse", make_model=TwoInputNet)


TASK, ALGO = "test_extending:two_input_lines", "test_extending:ScaledStepMAML"


def test_own_algorithm_and_task_train_and_evaluate_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", TASK, "--algo", ALGO, "--toy-step-scale", "2", "--toy-slope", "1.5",
                 "--inner-lr", "0.05", "--iterations", "400", "--meta-batch", "10",
                 "--val-every", "200", "--eval-tasks", "100", "--eval-steps", "5",
                 "--eval-shots", "10", "--baseline", "false", "--threads", "1",
                 "--no-progress", "--no-eval", "--out", str(run)]) == 0
    stored = (run / "config.yaml").read_text()
    assert "toy_step_scale: 2.0" in stored and "toy_slope: 1.5" in stored
    assert main(["eval", str(run), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "evaluating the best checkpoint" in out
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["results"]
    mse = {(r["method"], r["steps"]): r["mean"] for r in rows}
    # the meta-learned initialisation adapts: its error falls with steps, below a fresh model's
    assert mse[(ALGO, 5)] < 0.5 * mse[(ALGO, 0)]
    assert mse[(ALGO, 5)] < mse[("scratch", 5)]


def test_own_settings_are_offered_as_flags_with_their_help(capsys):
    parser = build_parser(["train", TASK, "--algo", ALGO])
    text = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "--toy-step-scale" in text and "multiplies inner_lr" in text
    assert "--toy-slope" in text and "largest |slope|" in text
    # flags of another task are not offered
    assert "--rotations" not in text


def test_a_setting_of_another_algorithm_is_refused_by_name(tmp_path, capsys):
    code = main(["train", TASK, "--algo", ALGO, "--imaml-lambda", "2", "--out", str(tmp_path)])
    assert code == 2
    assert "imaml_lambda" in capsys.readouterr().err


def test_scaled_step_reaches_the_learner():
    from metagrad.config import from_dict
    from metagrad.training.experiment import build

    cfg = from_dict({"task": TASK, "algo": ALGO, "toy_step_scale": 3.0, "inner_lr": 0.1,
                     "baseline": False})
    learner = build(cfg).learner
    assert isinstance(learner, ScaledStepMAML)
    assert learner.inner_lr == 0.1 * 3.0
    assert F.mse_loss is learner.loss_fn
