"""Logging backends (metagrad.training.loggers): metrics.csv and tensorboard/ next to
metrics.jsonl, resume without duplicates, a clear error without the tensorboard package, and the
training curve in every run directory."""

import csv
import json
import sys
from pathlib import Path

import pytest

from metagrad.cli import main
from metagrad.config import resolve
from metagrad.errors import ConfigError
from metagrad.training import loggers
from metagrad.training.loggers import CsvLogger, open_loggers, require_backends
from metagrad.training.loop import train
from metagrad.training.rl import resolve_rl


def small(**kw):
    base = dict(iterations=12, val_every=5, checkpoint_every=4, eval_tasks=20, eval_steps=2,
                log_every=1, val_tasks=10, meta_batch=5, baseline=False, threads=1)
    return resolve("sinusoid", "paper", {**base, **kw})


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_csv_matches_jsonl_and_its_header_grows_with_new_keys(tmp_path):
    run = train(small(log=["csv"]), tmp_path / "run", progress=False)
    assert run.iteration == 12
    columns, rows = csv_rows(tmp_path / "run" / "metrics.csv")
    records = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert columns[:2] == ["iteration", "seconds"]
    assert "val/mse" in columns  # first seen at iteration 5: the header grew
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in records]
    for row, record in zip(rows, records):
        assert set(row) == set(columns)  # rectangular
        for key in columns:
            if key in record:
                assert float(row[key]) == pytest.approx(record[key])
            else:
                assert row[key] == ""  # not logged at this iteration
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0


def test_csv_resume_drops_rows_after_the_checkpoint_and_a_cut_row(tmp_path):
    path = tmp_path / "metrics.csv"
    logger = CsvLogger(path, 0)
    for i in range(1, 7):
        logger.write({"iteration": i, "loss": i / 10, **({"val": 1.0} if i == 3 else {})})
    logger.close()
    with path.open("a") as f:
        f.write("7,0.7")  # a row cut by a kill
    logger = CsvLogger(path, 4)  # resumed from the checkpoint of iteration 4
    logger.write({"iteration": 5, "loss": 0.55, "new": 2.0})
    logger.close()
    columns, rows = csv_rows(path)
    assert columns == ["iteration", "loss", "val", "new"]
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[2]["val"] == "1.0" and rows[4]["loss"] == "0.55" and rows[4]["new"] == "2.0"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_killed_and_resumed_run_logs_each_iteration_once_in_every_backend(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(small(iterations=8, log=["csv", "tensorboard"]), out, progress=False)
    # as if killed at iteration 10 after the checkpoint of iteration 8: records 9 and 10 exist
    for logger in open_loggers(out, ["csv", "tensorboard"], 8):
        for i in (9, 10):
            logger.write({"iteration": i, "seconds": 1.0, "loss/maml": 99.0})
        logger.close()
    train(None, out, resume=True, iterations=12, progress=False)
    expected = list(range(1, 13))
    assert [r["iteration"] for r in jsonl(out / "metrics.jsonl")] == expected
    assert [int(r["iteration"]) for r in csv_rows(out / "metrics.csv")[1]] == expected
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss/maml")
    assert [e.step for e in losses] == expected  # the killed session's steps 9, 10 purged
    assert 99.0 not in [e.value for e in losses]
    assert [e.step for e in events.Scalars("val/mse")] == [5, 8, 10, 12]


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        require_backends(["tensorboard"])
    require_backends(["csv"])
    with pytest.raises(ConfigError, match="unknown backend 'wandb'"):
        require_backends(["wandb"])
    assert loggers.BACKENDS == ("csv", "tensorboard")


def test_cli_log_flag_and_missing_tensorboard(tmp_path, capsys, monkeypatch):
    argv = ["train", "sinusoid", "--iterations", "3", "--no-eval", "--no-progress",
            "--meta-batch", "2", "--val-tasks", "2", "--log", "csv"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "metrics.csv").is_file()
    assert "log:\n- csv\n" in (tmp_path / "a" / "config.yaml").read_text()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*argv[:-1], "tensorboard,csv", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()  # refused before the run directory is made
    assert main([*argv[:-1], "wandb", "--out", str(tmp_path / "c")]) == 2
    assert "log: cannot read 'wandb'" in capsys.readouterr().err


def test_rl_config_has_the_log_setting():
    assert resolve_rl({"log": "csv,tensorboard"}).log == ("csv", "tensorboard")
    assert resolve_rl({}).to_dict()["log"] == []
