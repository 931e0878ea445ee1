"""tools/results_tables.py: the README's result tables come from committed result files, and a
file that is incomplete or does not support its row is refused."""

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import results_tables as rt  # noqa: E402

ROWS = [{"method": "maml", "shots": 5, "steps": s, "mean": m, "ci95": 0.01, "tasks": 600,
         "split": "test"} for s, m in ((0, 2.5), (1, 0.5))]
TABLE = {"steps": [0, 1], "rows": [{"run": "r", "label": "MAML", "method": "maml", "shots": 5,
                                    "claims": {"task": "sinusoid", "meta_batch": 25}}]}


def make_run(results: Path, rows=ROWS, config=None, files=rt.RUN_FILES, training=None) -> None:
    folder = results / "r"
    folder.mkdir(parents=True)
    contents = {
        "eval.json": json.dumps({"metric": "mse", "checkpoint": "best.safetensors",
                                 "iteration": 70000, "results": rows,
                                 "training": training or {"ms_per_iteration": 6.4}}),
        "config.yaml": yaml.safe_dump(config or {"task": "sinusoid", "meta_batch": 25}),
        "README.md": "command, iterations, wall time\n"}
    for name in files:
        (folder / name).write_text(contents[name])


def test_a_table_is_generated_from_the_files(tmp_path):
    make_run(tmp_path)
    readme = "x\n<!-- results:t -->\nold\n<!-- /results -->\ny\n"
    out = rt.generate(readme, {"t": TABLE}, tmp_path)
    assert "| MAML | 5 | 2.500 ± 0.010 | 0.500 ± 0.010 | [r](results/r/) |" in out
    assert "old" not in out and out.startswith("x\n") and out.endswith("y\n")


@pytest.mark.parametrize("broken, message", [
    (dict(rows=[{k: v for k, v in ROWS[0].items() if k != "ci95"}]), "lacks ci95"),
    (dict(config={"task": "sinusoid", "meta_batch": 10}), "claims meta_batch=25"),
    (dict(files=("eval.json", "config.yaml")), "README.md is missing"),
    (dict(rows=[dict(ROWS[0], method="anil")]), "no rows of method 'maml'"),
    (dict(training={"seconds": 60}), "no training.ms_per_iteration"),
])
def test_incomplete_or_contradicting_results_are_refused(tmp_path, broken, message):
    make_run(tmp_path, **broken)
    table = dict(TABLE, extra=[{"header": "ms / iteration", "key": "ms_per_iteration"}])
    with pytest.raises(rt.ResultsError, match=message):
        rt.generate("<!-- results:t -->\n<!-- /results -->\n", {"t": table}, tmp_path)


def test_extra_columns_come_from_the_training_record(tmp_path):
    make_run(tmp_path)
    table = dict(TABLE, extra=[{"header": "ms / iteration", "key": "ms_per_iteration"}])
    out = rt.generate("<!-- results:t -->\n<!-- /results -->\n", {"t": table}, tmp_path)
    assert "| row | K | 0 steps | 1 steps | ms / iteration | run |" in out
    assert "| MAML | 5 | 2.500 ± 0.010 | 0.500 ± 0.010 | 6.4 | [r](results/r/) |" in out


def test_a_row_may_read_another_evaluation_of_its_run(tmp_path):
    make_run(tmp_path)
    more_tasks = [dict(row, mean=row["mean"] + 1, tasks=2400) for row in ROWS]
    (tmp_path / "r" / "eval-2400tasks.json").write_text(json.dumps(
        {"metric": "mse", "checkpoint": "best.safetensors", "iteration": 70000,
         "results": more_tasks}))
    table = {"steps": [0, 1], "rows": [*TABLE["rows"],
                                       dict(TABLE["rows"][0], eval="eval-2400tasks.json")]}
    out = rt.generate("<!-- results:t -->\n<!-- /results -->\n", {"t": table}, tmp_path)
    assert "| MAML | 5 | 2.500 ± 0.010 | 0.500 ± 0.010 | [r](results/r/) |" in out
    assert "| MAML | 5 | 3.500 ± 0.010 | 1.500 ± 0.010 | [r](results/r/) |" in out
    table["rows"][1]["eval"] = "eval-missing.json"
    with pytest.raises(rt.ResultsError, match="eval-missing.json is missing"):
        rt.generate("<!-- results:t -->\n<!-- /results -->\n", {"t": table}, tmp_path)


def test_the_readme_tables_match_the_committed_results():
    assert rt.main(["--check"]) == 0


def test_a_non_finite_result_reads_as_diverged(tmp_path):
    make_run(tmp_path, rows=[ROWS[0], dict(ROWS[1], mean=float("nan"), ci95=float("nan"))])
    out = rt.generate("<!-- results:t -->\n<!-- /results -->\n", {"t": TABLE}, tmp_path)
    assert "| MAML | 5 | 2.500 ± 0.010 | diverged (non-finite) | [r](results/r/) |" in out
