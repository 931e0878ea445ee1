"""The README's result tables, generated from the committed runs under ``results/``.

``results/tables.yaml`` declares each table: its rows name a run directory (``results/<run>/``
holding ``eval.json``, ``config.yaml`` and a ``README.md`` with the command, iterations and wall
time), the method and shots of the row in ``eval.json``, and the settings the row claims
(``claims``), which must match the run's ``config.yaml``. A row may read another evaluation of
the same run (``eval``: a JSON file in the run's folder, e.g. one on more test tasks) instead of
``eval.json``. A table may add ``extra`` columns, each a
``{header, key}`` read from the ``training`` record of the row's ``eval.json`` (e.g. the
benchmark's ms per iteration). The README holds each table between
``<!-- results:NAME -->`` and ``<!-- /results -->``.

    python tools/results_tables.py           # rewrite the tables in README.md
    python tools/results_tables.py --check   # exit 1 if README.md differs from the results
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = ("method", "shots", "steps", "mean", "ci95", "tasks", "split")
RUN_FILES = ("eval.json", "config.yaml", "README.md")


class ResultsError(Exception):
    """A result file that is missing, incomplete, or does not support the row claiming it."""


def load_run(results: Path, run: str, evaluation_file: str = "eval.json"
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's evaluation (``eval.json`` unless another file of its folder is named) and its
    ``config.yaml``, checked for the fields the tables use."""
    folder = results / run
    for name in (*RUN_FILES, evaluation_file):
        if not (folder / name).is_file():
            raise ResultsError(f"{folder / name} is missing; every reported run commits "
                               f"{', '.join(RUN_FILES)} and the evaluation its rows read")
    evaluation_path = folder / evaluation_file
    evaluation = json.loads(evaluation_path.read_text())
    for key in ("metric", "checkpoint", "iteration", "results"):
        if key not in evaluation:
            raise ResultsError(f"{evaluation_path} has no {key!r}")
    for i, row in enumerate(evaluation["results"]):
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ResultsError(f"{evaluation_path}: result {i} lacks {', '.join(missing)}")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if not isinstance(config, dict):
        raise ResultsError(f"{folder / 'config.yaml'} is not a mapping of settings")
    return evaluation, config


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return "–"
    if not math.isfinite(row["mean"]):
        return "diverged (non-finite)"
    scale, digits = (100, 2) if metric == "accuracy" else (1, 3)
    return f"{row['mean'] * scale:.{digits}f} ± {row['ci95'] * scale:.{digits}f}"


def _extra_cells(table: dict[str, Any], evaluation: dict[str, Any], source: str) -> list[str]:
    training = evaluation.get("training", {})
    cells = []
    for column in table.get("extra", []):
        if column["key"] not in training:
            raise ResultsError(f"{source} has no training.{column['key']} "
                               f"(column {column['header']!r})")
        cells.append(f"{training[column['key']]:g}")
    return cells


def render(table: dict[str, Any], results: Path) -> str:
    """The markdown of one declared table."""
    steps = table["steps"]
    extra = [column["header"] for column in table.get("extra", [])]
    lines = ["| " + " | ".join(["row", "K", *(f"{s} steps" for s in steps), *extra, "run"])
             + " |", "|" + "---|" * (len(steps) + len(extra) + 3)]
    for spec in table["rows"]:
        evaluation_file = spec.get("eval", "eval.json")
        evaluation, config = load_run(results, spec["run"], evaluation_file)
        for key, claimed in spec.get("claims", {}).items():
            if config.get(key) != claimed:
                raise ResultsError(f"row {spec['label']!r} claims {key}={claimed!r} but "
                                   f"results/{spec['run']}/config.yaml has "
                                   f"{key}={config.get(key)!r}")
        rows = {r["steps"]: r for r in evaluation["results"]
                if r["method"] == spec["method"] and r["shots"] == spec["shots"]}
        if not rows:
            raise ResultsError(f"results/{spec['run']}/{evaluation_file} has no "
                               f"rows of method {spec['method']!r} with {spec['shots']} shots")
        cells = [_cell(rows.get(s), evaluation["metric"]) for s in steps]
        cells += _extra_cells(table, evaluation, f"results/{spec['run']}/{evaluation_file}")
        lines.append("| " + " | ".join([spec["label"], str(spec["shots"]), *cells,
                                         f"[{spec['run']}](results/{spec['run']}/)"]) + " |")
    return "\n".join(lines)


def generate(readme: str, tables: dict[str, Any], results: Path) -> str:
    """``readme`` with every declared table's markers filled from ``results``."""
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results -->)",
                             re.S)
        if not pattern.search(readme):
            raise ResultsError(f"README.md has no '<!-- results:{name} -->' ... "
                               "'<!-- /results -->' block")
        body = render(table, results)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), readme)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md differs from what results/ generates")
    args = parser.parse_args(argv)
    results = ROOT / "results"
    tables = yaml.safe_load((results / "tables.yaml").read_text()) or {}
    readme = (ROOT / "README.md").read_text()
    try:
        updated = generate(readme, tables, results)
    except ResultsError as exc:
        print(f"results_tables: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != readme:
            print("README.md's result tables differ from results/: run "
                  "python tools/results_tables.py", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
