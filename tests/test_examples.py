"""The scripts in examples/ run from a fresh clone, and what they print shows learning."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}


def run(script: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script)], env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def percents(line: str) -> list[float]:
    return [float(p) for p in re.findall(r"(\d+(?:\.\d+)?)%", line)]


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "own_dataset.py", "own_model.py", "own_environment.py"}


@pytest.mark.slow
def test_own_model_adapts_on_held_out_classes():
    line = run("own_model.py").strip().splitlines()[-1]
    before, *after = percents(line)
    assert before < 35 and max(after) > before + 20, line


@pytest.mark.slow
def test_own_dataset_adapts_on_held_out_classes():
    out = run("own_dataset.py")
    zero = percents(next(x for x in out.splitlines() if "meta-trained, 0 steps" in x))[0]
    k = percents([x for x in out.splitlines() if "meta-trained" in x][-1])[0]
    assert k > zero + 20, out


@pytest.mark.slow
def test_own_environment_improves_with_one_adaptation_step():
    line = run("own_environment.py").strip().splitlines()[-1]
    before, after = (float(v) for v in re.findall(r"-?\d+\.\d+", line))
    assert after > before, line
