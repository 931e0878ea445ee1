"""A setting that no code reads is caught: every field of the run configurations and of every
registered algorithm's and task's ``Options`` is read somewhere under ``metagrad/`` outside the
class that declares it (an attribute ``.name`` or a string ``"name"``, e.g. a key or getattr)."""

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import NamedTuple

import pytest

from metagrad.algorithms import ALGORITHMS
from metagrad.config import (
    ExperimentConfig,
    RunSettings,
    algorithm_class,
    options_class,
    task_factory,
)
from metagrad.rl.settings import RLConfig
from metagrad.tasks import TASKS

PACKAGE = Path(__file__).resolve().parents[1] / "metagrad"


class Declared(NamedTuple):
    """A settings class: where it is declared and its field names."""

    path: Path
    name: str
    fields: tuple[str, ...]


def declared(cls: type) -> Declared:
    return Declared(Path(inspect.getsourcefile(cls)).resolve(), cls.__name__,
                    tuple(f.name for f in dataclasses.fields(cls)
                          if not f.metadata.get("internal")))


def reads(tree: ast.AST, skip: ast.ClassDef | None) -> set[str]:
    """Names read in ``tree`` (attribute loads and string constants), outside ``skip``."""
    inside = set() if skip is None else {id(n) for n in ast.walk(skip)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return found


def unread_fields(classes: list[Declared], sources: list[Path]) -> list[str]:
    """``Class.field`` for every field of ``classes`` that no file of ``sources`` reads outside
    the class's own body (its declaration, defaults, and its own validation do not count)."""
    trees = {p.resolve(): ast.parse(p.read_text(), str(p)) for p in sources}
    unread = []
    for cls in classes:
        names: set[str] = set()
        for path, tree in trees.items():
            own = None
            if path == cls.path:
                own = next(n for n in ast.walk(tree)
                           if isinstance(n, ast.ClassDef) and n.name == cls.name)
            names |= reads(tree, own)
        unread += [f"{cls.name}.{f}" for f in cls.fields if f not in names]
    return unread


def settings_classes() -> list[type]:
    classes = [RunSettings, ExperimentConfig, RLConfig]
    for name in ALGORITHMS:
        classes.append(options_class(algorithm_class(name)))
    for name in TASKS:
        classes.append(options_class(task_factory(name)))
    return list(dict.fromkeys(c for c in classes if dataclasses.fields(c)))


def test_every_setting_is_read_by_some_code():
    classes = [declared(c) for c in settings_classes()]
    assert len(classes) > 5  # the registries were walked
    assert not unread_fields(classes, sorted(PACKAGE.rglob("*.py")))


PLANTED = '''
from dataclasses import dataclass

@dataclass
class Options:
    used: int = 1
    validated_only: int = 2
    planted: float = 0.5  # declared, documented, never read

    def validate(self):
        assert self.validated_only > 0
'''
USER = '''
def build(options):
    return options.used * 2
'''


def test_the_checker_catches_a_planted_unused_field(tmp_path):
    (tmp_path / "options.py").write_text(PLANTED)
    (tmp_path / "user.py").write_text(USER)
    cls = Declared((tmp_path / "options.py").resolve(), "Options",
                   ("used", "validated_only", "planted"))
    sources = [tmp_path / "options.py", tmp_path / "user.py"]
    assert unread_fields([cls], sources) == ["Options.validated_only", "Options.planted"]
    (tmp_path / "user.py").write_text(USER + "\nKEYS = ['planted']\n"
                                      "def check(o):\n    return o.validated_only\n")
    assert unread_fields([cls], sources) == []


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_declarations_are_found(cls):
    """The checker parses the file that declares each settings class."""
    found = declared(cls)
    tree = ast.parse(found.path.read_text())
    assert any(isinstance(n, ast.ClassDef) and n.name == found.name for n in ast.walk(tree))


def test_keep_checkpoints_is_obeyed(tmp_path):
    """Caught by the walker: keep_checkpoints was declared but the run kept 3 regardless."""
    from metagrad.config import resolve
    from metagrad.training.loop import train

    cfg = resolve("sinusoid", "paper", dict(iterations=6, checkpoint_every=1, val_every=1000,
                                            meta_batch=2, val_tasks=2, baseline=False,
                                            keep_checkpoints=2, threads=1))
    train(cfg, tmp_path / "run", progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert kept == ["ckpt-0000005.safetensors", "ckpt-0000006.safetensors"]


def test_meta_rl_settings_declare_every_run_setting():
    """The run loop reads the same settings of supervised and meta-RL runs; RLConfig (frozen, so
    it cannot inherit RunSettings) must declare each of them."""
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    assert shared - {f.name for f in dataclasses.fields(RLConfig)} == set()
