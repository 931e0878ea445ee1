"""Checkpoints: hostile or corrupt files end as a one-line CheckpointError (never KeyError,
RecursionError or JSONDecodeError); failed writes keep the previous checkpoint and leave no
temporary file; stray files in the checkpoint directory are ignored."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from metagrad.errors import CheckpointError
from metagrad.training import checkpoint as ckpt


def state():
    return {"iteration": 7, "best": None, 3: [1.5, "x", True, None],
            "learner": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2, dtype=torch.int64)},
            "np": np.arange(3), "nested": [[{"t": torch.ones(1)}]]}


def assert_same(a, b):
    assert type(a) is type(b) or isinstance(a, torch.Tensor)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    else:
        assert a == b


def test_round_trip(tmp_path):
    back = ckpt.load(ckpt.save(state(), tmp_path / "c.safetensors"))
    expected = state()
    expected["np"] = torch.arange(3)
    assert_same(back, expected)


def nest(depth):
    inner = 1
    for _ in range(depth):
        inner = {"__dict__": [["k", inner]]}
    return json.dumps(inner)


HOSTILE = {
    "no metadata at all": None,
    "foreign format": {"format": "something-else", "state": "{}"},
    "missing state": {"format": ckpt.FORMAT},
    "state not JSON": {"format": ckpt.FORMAT, "state": "{not json"},
    "state empty": {"format": ckpt.FORMAT, "state": ""},
    "top level a list": {"format": ckpt.FORMAT, "state": "[1, 2]"},
    "top level a number": {"format": ckpt.FORMAT, "state": "3"},
    "plain JSON object": {"format": ckpt.FORMAT, "state": '{"a": 1}'},
    "__dict__ not a list": {"format": ckpt.FORMAT, "state": '{"__dict__": 5}'},
    "pair not a pair": {"format": ckpt.FORMAT, "state": '{"__dict__": [["only key"]]}'},
    "pair a string": {"format": ckpt.FORMAT, "state": '{"__dict__": ["ab"]}'},
    "float key": {"format": ckpt.FORMAT, "state": '{"__dict__": [[1.5, 2]]}'},
    "list key": {"format": ckpt.FORMAT, "state": '{"__dict__": [[[1], 2]]}'},
    "tensor ref not a string": {"format": ckpt.FORMAT, "state": '{"__tensor__": 3}'},
    "tensor ref with extras": {"format": ckpt.FORMAT,
                               "state": '{"__tensor__": "s/w", "__dict__": []}'},
    "missing tensor": {"format": ckpt.FORMAT,
                       "state": '{"__dict__": [["w", {"__tensor__": "s/nope"}]]}'},
    "deep lists": {"format": ckpt.FORMAT, "state": "[" * 200 + "]" * 200},
    "deep dicts": {"format": ckpt.FORMAT, "state": nest(ckpt.MAX_DEPTH + 5)},
    "JSON deeper than the interpreter": {"format": ckpt.FORMAT,
                                         "state": "[" * 200_000 + "]" * 200_000},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_a_one_line_checkpoint_error(tmp_path, name):
    path = tmp_path / "hostile.safetensors"
    save_file({"s/w": torch.zeros(2)}, str(path), metadata=HOSTILE[name])
    with pytest.raises(CheckpointError) as info:
        ckpt.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 400, message


def test_nesting_up_to_the_bound_loads(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({}, str(path), metadata={"format": ckpt.FORMAT, "state": nest(ckpt.MAX_DEPTH)})
    value = ckpt.load(path)
    for _ in range(ckpt.MAX_DEPTH - 1):
        value = value["k"]
    assert value == {"k": 1}


def test_save_refuses_what_load_would_refuse(tmp_path):
    deep: list = []
    for _ in range(ckpt.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        ckpt.save({"x": deep}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64, b"PK\x03\x04 a zip file"])
def test_garbage_files_are_refused(tmp_path, content):
    path = tmp_path / "c.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a metagrad checkpoint") as info:
        ckpt.load(path)
    assert "\n" not in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    path = ckpt.save(state(), tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError):
        ckpt.load(path)


# -- failed writes -----------------------------------------------------------------------------
def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("fail", ["save_file", "replace"])
@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "No space left on device"),
                                              (errno.EROFS, "Read-only file system"),
                                              (errno.EACCES, "Permission denied")])
def test_os_error_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail, code,
                                                              reason):
    """Disk full, read-only or unwritable directory (simulated: chmod does not stop root)."""
    path = ckpt.save(state(), tmp_path / "c.safetensors")
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata):
        with open(filename, "wb") as f:  # a partial file, as a full disk leaves
            f.write(b"partial")
        raise OSError(code, os.strerror(code))

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    if fail == "save_file":
        monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    else:
        monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError) as info:
        ckpt.save({"iteration": 8}, path)
    message = str(info.value)
    assert str(path) in message and reason in message and "previous checkpoint is kept" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert path.read_bytes() == before and ckpt.load(path)["iteration"] == 7


def test_path_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="could not write the checkpoint"):
        ckpt.save(state(), tmp_path / "file" / "checkpoints" / "c.safetensors")


def test_checkpoint_dir_save_failure_is_a_checkpoint_error(tmp_path, monkeypatch):
    directory = ckpt.CheckpointDir(tmp_path, keep=2)
    directory.save(state(), 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left"):
        directory.save(state(), 2)
    monkeypatch.undo()
    assert directory.all() == [tmp_path / "ckpt-0000001.safetensors"]
    assert leftovers(tmp_path) == []


# -- temporary files of dead writers ------------------------------------------------------------
def test_clean_temporary_files_removes_only_dead_writers(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = int(finished.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".ckpt-0000003.safetensors.tmp-{dead}": False,
                 f".best.safetensors.tmp-{os.getpid()}": False,
                 f".ckpt-0000004.safetensors.tmp-{live.pid}": True,
                 "notes.txt": True, ".hidden": True, ".x.tmp-notapid": True,
                 "ckpt-0000001.safetensors": True}
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = ckpt.clean_temporary_files(tmp_path)
        assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items()
                                                         if not kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in
                                                                    names.items() if kept)
    finally:
        live.kill()
        live.wait()
    assert ckpt.clean_temporary_files(tmp_path / "missing") == []


# -- stray files ----------------------------------------------------------------------------------
def test_checkpoint_dir_ignores_stray_files(tmp_path):
    directory = ckpt.CheckpointDir(tmp_path, keep=2)
    for name in ("ckpt-abc.safetensors", "ckpt-12.safetensors.bak", "notes.txt",
                 ".ckpt-0000009.safetensors.tmp-123", "ckpt--1.safetensors"):
        (tmp_path / name).write_text("stray")
    (tmp_path / "ckpt-0000099.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="no last checkpoint"):
        directory.read("last")
    for i in (1, 2, 3):
        directory.save({"iteration": i}, i)
    assert [p.name for p in directory.all()] == ["ckpt-0000002.safetensors",
                                                 "ckpt-0000003.safetensors"]
    path, got = directory.read("last")
    assert path.name == "ckpt-0000003.safetensors" and got["iteration"] == 3
    assert directory.latest_state()["iteration"] == 3
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        directory.read("best")
    with pytest.raises(ValueError, match="which="):
        directory.read("newest")
    assert (tmp_path / "notes.txt").read_text() == "stray"


def test_checkpoint_dir_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        ckpt.CheckpointDir(tmp_path, keep=0)
