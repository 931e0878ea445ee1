"""Packaging: ``python -m metagrad``, the wheel's contents (``py.typed``, the license), and the
API reference site, whose strict build passes on the real docs and fails on a broken
cross-reference."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_docs_tools = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings_handlers.python") is None,
    reason="mkdocs and mkdocstrings[python] are not installed: pip install -e '.[docs]' "
           "(the dev extra includes them)")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_python_m_metagrad_help():
    result = run("-m", "metagrad", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: metagrad")


def test_wheel_ships_py_typed_and_license(tmp_path):
    """Built without isolation from a copy of the sources (the work tree stays clean), with the
    setuptools of this environment (the dev extra asks for the release the build needs)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "metagrad", src / "metagrad",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    result = run("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                 "-w", str(tmp_path / "dist"), str(src))
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "dist").glob("metagrad-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
    assert "metagrad/py.typed" in names
    assert "metagrad/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in text
    assert "Classifier: Typing :: Typed" in text


def build_docs(config: Path, site: Path) -> subprocess.CompletedProcess:
    """Strict build (not --quiet: that hides the warnings which strict mode counts)."""
    return run("-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site))


@needs_docs_tools
def test_docs_build_strict(tmp_path):
    result = build_docs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "site" / "api" / "algorithms" / "index.html").read_text()
    assert 'id="metagrad.algorithms.maml.MAML"' in page


@needs_docs_tools
def test_docs_build_fails_on_a_broken_reference(tmp_path):
    """The same site with one reference to an object that does not exist: the build fails and
    names it."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    (project / "metagrad").symlink_to(ROOT / "metagrad")  # the handler reads paths: [.]
    index = project / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [missing][metagrad.nope].\n")
    result = build_docs(project / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "metagrad.nope" in result.stderr
