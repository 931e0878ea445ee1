"""The command line as a new user meets it: one row per complaint of the CLI issue."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import metagrad
from metagrad.cli import build_parser, main

QUICK = ["--iterations", "6", "--val-every", "3", "--val-tasks", "5", "--eval-tasks", "10",
         "--eval-steps", "2", "--eval-shots", "5", "--meta-batch", "4", "--threads", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "sinusoid", *QUICK, "--out", str(out)]) == 0
    return out


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "metagrad", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"metagrad {metagrad.__version__}"


def test_debug_is_accepted_after_the_command(tmp_path, capsys):
    with pytest.raises(Exception, match="inner_lr"):
        main(["train", "sinusoid", "--inner-lr", "-1", "--debug", "--out", str(tmp_path)])
    assert main(["train", "sinusoid", "--inner-lr", "-1", "--out", str(tmp_path)]) == 2


def test_help_documents_each_flag_with_type_and_default_in_groups():
    argv = ["train", "sinusoid", "--algo", "imaml"]
    text = build_parser(argv)._subparsers._group_actions[0].choices["train"].format_help()
    assert "inner loop:" in text and "outer loop:" in text and "run:" in text
    flat = " ".join(text.split())
    assert "--meta-batch INT tasks per meta-iteration [int; default: 25]" in flat
    assert "--imaml-lambda" in text  # the chosen algorithm's options
    assert "--max-kl" not in text and "--mamlpp-msl-epochs" not in text
    rl = build_parser(["train", "rl"])._subparsers._group_actions[0].choices["train"]
    assert "--max-kl" in rl.format_help() and "--meta-lr-schedule" not in rl.format_help()


@pytest.mark.parametrize(("argv", "inner_lr", "meta_batch"), [
    ([], "0.4 (preset paper; else 0.01)", "32 (preset paper; else 25)"),
    (["--ways", "20"], "0.1 (preset paper-20way; else 0.01)",
     "16 (preset paper-20way; else 25)"),
    (["--preset", "paper-20way"], "0.1 (preset paper-20way; else 0.01)",
     "16 (preset paper-20way; else 25)"),
    (["--preset", "no-such-preset"], "0.01]", "25]"),  # reported when the command runs
])
def test_help_shows_the_defaults_of_the_preset_that_applies(argv, inner_lr, meta_batch):
    """``train omniglot --help`` shows the values the run would get (the paper's preset for
    the ways asked for), not the bare field defaults."""
    parser = build_parser(["train", "omniglot", *argv])
    flat = " ".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    assert f"--inner-lr FLOAT α, the inner-loop step size [float; default: {inner_lr}" in flat
    assert f"--meta-batch INT tasks per meta-iteration [int; default: {meta_batch}" in flat


def test_config_of_another_task_is_refused(tmp_path, capsys):
    other = tmp_path / "omni.yaml"
    other.write_text(yaml.safe_dump({"task": "omniglot", "ways": 5}))
    assert main(["train", "sinusoid", "--config", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "configures task 'omniglot'" in capsys.readouterr().err


def test_config_yaml_holds_only_the_fields_that_apply(run):
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert "ways" not in stored and "rotations" not in stored and "imaml_lambda" not in stored
    assert stored["task"] == "sinusoid" and stored["meta_batch"] == 4


def test_print_config_shows_the_resolved_settings(capsys):
    assert main(["train", "omniglot", "--ways", "20", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["ways"] == 20 and printed["inner_steps"] == 5  # the paper's 20-way preset


def test_eval_never_overwrites_and_training_evaluates_the_best_checkpoint(run, capsys):
    first = json.loads((run / "eval.json").read_text())
    assert first["checkpoint"] == "best.safetensors"
    assert main(["eval", str(run), "--tasks", "7"]) == 0
    assert "evaluating the best checkpoint" in capsys.readouterr().out
    assert json.loads((run / "eval.json").read_text()) == first
    again = json.loads((run / "eval-best-7tasks" / "eval.json").read_text())
    assert again["results"][0]["tasks"] == 7
    assert main(["eval", str(run), "--tasks", "7"]) == 0
    assert (run / "eval-best-7tasks-2" / "eval.json").is_file()


def test_resume_keeps_the_config_and_refuses_a_preset(run, tmp_path, capsys):
    before = (run / "config.yaml").read_text()
    assert main(["train", "sinusoid", "--out", str(run), "--resume", "--iterations", "8",
                 "--no-eval", "--no-progress"]) == 0
    assert (run / "config.yaml").read_text() == before
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["event"] == "resume" and history[-1]["extended_from"] == 6
    assert main(["train", "sinusoid", "--out", str(run), "--resume", "--preset", "quick"]) == 2
    assert "remove --preset" in capsys.readouterr().err


def test_presets_lists_supervised_and_rl_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "omniglot --preset paper-20way" in out and "train rl --env navigation2d" in out


def test_eval_on_the_training_split_writes_its_own_folder(run, capsys):
    """Sinusoid has no class splits: every split draws from one distribution, so the training
    split's numbers equal the test split's on the same tasks; the folder and the rows say
    which split they measured."""
    assert main(["eval", str(run), "--tasks", "5", "--split", "train", "--no-baselines"]) == 0
    assert "over 5 train tasks" in capsys.readouterr().out
    seen = json.loads((run / "eval-best-5tasks-train" / "eval.json").read_text())
    assert seen["split"] == "train" and {r["split"] for r in seen["results"]} == {"train"}
    assert main(["eval", str(run), "--tasks", "5", "--no-baselines"]) == 0
    test = json.loads((run / "eval-best-5tasks" / "eval.json").read_text())
    assert [r["mean"] for r in seen["results"]] == [r["mean"] for r in test["results"]]
    with pytest.raises(SystemExit):  # argparse: "invalid choice"
        main(["eval", str(run), "--split", "training"])


def test_eval_folder_is_named_by_the_runs_own_number_of_test_tasks(run):
    assert main(["eval", str(run)]) == 0
    tasks = yaml.safe_load((run / "config.yaml").read_text())["eval_tasks"]
    saved = json.loads((run / f"eval-best-{tasks}tasks" / "eval.json").read_text())
    assert saved["results"][0]["tasks"] == tasks
