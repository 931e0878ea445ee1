"""Checkpoints that cannot run code when loaded: one safetensors file whose header metadata holds
the non-tensor state as JSON. Written atomically (temporary file, fsync, rename), so a crash or a
kill while writing leaves the previous checkpoint intact.

Any nested structure of dicts, lists, numbers, strings and tensors round-trips (model and
optimizer state dicts, RNG states, counters).
"""

from __future__ import annotations

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
_TENSOR = "__tensor__"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"checkpoint keys must be str or int at {path}")
        return {"__dict__": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _flatten(torch.from_numpy(obj.copy()), path, tensors)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {path})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Writes ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "s", tensors)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(structure)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save`; anything else is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a metagrad checkpoint (not a readable safetensors file: {exc}); "
            "pickle files are refused because loading them can run arbitrary code"
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a metagrad checkpoint "
            f"(format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    return _unflatten(json.loads(metadata["state"]), tensors)


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
    ``best.safetensors``."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def all(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p)
                 for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
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
        path = self.latest() if which == "last" else self.directory / "best.safetensors"
        if path is None or not path.is_file():
            raise CheckpointError(f"no {which} checkpoint in {self.directory}; train first")
        return path, load(path)

    def latest_state(self) -> dict[str, Any] | None:
        """The newest checkpoint's state, or ``None`` when there is none (nothing to resume)."""
        latest = self.latest()
        return None if latest is None else load(latest)
