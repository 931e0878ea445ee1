"""Checkpoints that cannot run code when loaded: one safetensors file whose header metadata holds
the non-tensor state as JSON. Written atomically (temporary file, fsync, rename), so a crash or a
kill while writing leaves the previous checkpoint intact.

Any nested structure of dicts, lists, numbers, strings and tensors round-trips (model and
optimizer state dicts, RNG states, counters), up to :data:`MAX_DEPTH` levels of nesting.

Contract: :func:`load` checks the whole structure before returning and turns every defect of the
file (not safetensors, foreign format, missing or non-JSON ``state``, a malformed node, nesting
deeper than :data:`MAX_DEPTH`, a reference to a tensor the file does not hold) into a one-line
:class:`~metagrad.errors.CheckpointError`. :func:`save` turns every OS failure (disk full,
read-only directory, a path below a file) into a :class:`~metagrad.errors.CheckpointError` naming
the path and the reason, after removing its temporary file; the previous file at ``path`` is
then untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from metagrad.errors import CheckpointError

FORMAT = "metagrad-checkpoint/1"
MAX_DEPTH = 64
_TENSOR = "__tensor__"
_DICT = "__dict__"
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"checkpoint state nested deeper than {MAX_DEPTH} levels (at {path})")
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"checkpoint keys must be str or int at {path}")
        return {_DICT: [[k, _flatten(v, f"{path}/{k}", tensors, depth + 1)]
                        for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, f"{path}/{i}", tensors, depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _flatten(torch.from_numpy(obj.copy()), path, tensors, depth)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {path})")


class _Malformed(Exception):
    """A defect of the stored structure; :func:`load` reports it with the file's path."""


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """The inverse of :func:`_flatten`, checking every node (raises :class:`_Malformed`)."""
    if depth > MAX_DEPTH:
        raise _Malformed(f"the state is nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            name = obj[_TENSOR]
            if not isinstance(name, str) or name not in tensors:
                raise _Malformed(f"the state refers to a tensor {str(name)[:80]!r} that the file "
                                 "does not hold")
            return tensors[name]
        pairs = obj.get(_DICT)
        if set(obj) != {_DICT} or not isinstance(pairs, list):
            raise _Malformed(f"a node has keys {sorted(obj)[:5]}, expected "
                             f"[{_DICT!r}] or [{_TENSOR!r}]")
        out = {}
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2
                    and isinstance(pair[0], str | int) and not isinstance(pair[0], bool)):
                raise _Malformed(f"a dict entry is {str(pair)[:80]}, expected a [key, value] "
                                 "pair with a str or int key")
            out[pair[0]] = _unflatten(pair[1], tensors, depth + 1)
        return out
    if isinstance(obj, list):
        return [_unflatten(v, tensors, depth + 1) for v in obj]
    return obj  # JSON scalars: None, bool, int, float, str


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Writes ``state`` to ``path`` atomically: to ``.NAME.tmp-PID`` beside it, fsync, rename,
    fsync of the directory. An OS failure raises :class:`CheckpointError` and leaves no temporary
    file; the file previously at ``path`` (if any) is kept."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "s", tensors)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(structure)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"could not write the checkpoint {path} ({reason}); the previous "
                              "checkpoint is kept") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CheckpointError(f"wrote the checkpoint {path} but could not sync its directory "
                              f"({exc.strerror or exc}); it may not survive a power loss") from None
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save`; anything else is refused, never executed, and
    every defect is a one-line :class:`CheckpointError` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a metagrad checkpoint (not a readable safetensors file: {reason}); "
            "pickle files are refused because loading them can run arbitrary code"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a metagrad checkpoint "
            f"(format {str(metadata.get('format'))[:80]!r}, expected {FORMAT!r})"
        )
    if "state" not in metadata:
        raise CheckpointError(f"{path} is a corrupt checkpoint: its header has no 'state'")
    try:
        structure = json.loads(metadata["state"])
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = f"{exc.msg} at {exc.pos}" if isinstance(exc, json.JSONDecodeError) else (
            "nested too deeply")
        raise CheckpointError(f"{path} is a corrupt checkpoint: its 'state' is not valid JSON "
                              f"({reason})") from None
    try:
        state = _unflatten(structure, tensors)
    except _Malformed as exc:
        raise CheckpointError(f"{path} is a corrupt checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is a corrupt checkpoint: its state is a "
                              f"{type(state).__name__}, not a dict")
    return state


def clean_temporary_files(directory: str | Path) -> list[Path]:
    """Removes the temporary files (``.NAME.tmp-PID``) that writers killed during :func:`save`
    left in ``directory``, and returns their paths.

    A file is removed when its writer cannot still be writing it: its PID is not a live process,
    or is this process's own PID (a predecessor that died with the same PID, as after a container
    restart; do not call this while this process is saving). Files of live PIDs are kept, so it is
    safe without the run lock; a dead writer's PID reused by an unrelated process only delays the
    removal to a later call. Other files are never touched; a missing directory is empty.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or not p.is_file() or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process other than this one."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists under another user / not a pid we can probe: keep its file
    return True


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random state a run depends on: python, numpy, torch, and the given generators."""
    np_state = np.random.get_state()
    return {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1], *np_state[2:]],
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }


def restore_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


_NAME = re.compile(r"^ckpt-(\d+)\.safetensors$")


class CheckpointDir:
    """``RUN_DIR/checkpoints``: ``ckpt-NNNNNNN.safetensors`` (the last ``keep`` of them) and
    ``best.safetensors``. Anything else in the directory (temporary files, stray files, a
    directory named like a checkpoint) is ignored."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the latest checkpoint must be kept")
        self.directory = Path(directory)
        self.keep = keep

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _NAME.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], iteration: int, best: bool = False) -> Path:
        path = save(state, self.directory / f"ckpt-{iteration:07d}.safetensors")
        if best:
            save(state, self.directory / "best.safetensors")
        for old in self.all()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def read(self, which: str = "last") -> tuple[Path, dict[str, Any]]:
        """The ``"last"`` or ``"best"`` checkpoint's path and state; a clear error if absent."""
        if which not in ("last", "best"):
            raise ValueError(f"which={which!r}, expected 'last' or 'best'")
        path = self.latest() if which == "last" else self.directory / "best.safetensors"
        if path is None or not path.is_file():
            raise CheckpointError(f"no {which} checkpoint in {self.directory}; train first")
        return path, load(path)

    def preferred(self) -> str:
        """``"best"`` when a validation-selected checkpoint exists, else ``"last"``."""
        return "best" if (self.directory / "best.safetensors").is_file() else "last"

    def latest_state(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or ``None`` when there is none (nothing to resume)."""
        latest = self.latest()
        return None if latest is None else load(latest)


def read_start(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a new run starts its weights from (the ``init_from`` setting): a
    checkpoint file, or a run directory's validation-selected checkpoint (its last when it was
    never validated). Errors are one-line :class:`CheckpointError` naming ``init_from``."""
    path = Path(source)
    try:
        if path.is_dir():
            checkpoints = CheckpointDir(path / "checkpoints")
            if checkpoints.latest() is None and checkpoints.preferred() == "last":
                raise CheckpointError(f"{path} holds no checkpoint (pass a run directory of "
                                      "`metagrad train --out`, or a checkpoint file)")
            return checkpoints.read(checkpoints.preferred())
        return path, load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"init_from: {exc}") from None
