"""Files shared by the image data sets: where data and caches live (``METAGRAD_DATA``,
``METAGRAD_CACHE``) and atomic, source-keyed cache files.

Episodes themselves are sampled by :class:`metagrad.tasks.fewshot.FewShotTasks` (one mechanism
for every data set).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from metagrad.tasks.fewshot import FewShotTasks

DATA_ENV = "METAGRAD_DATA"
CACHE_ENV = "METAGRAD_CACHE"

log = logging.getLogger(__name__)


EpisodeSampler = FewShotTasks.from_tensor
"""The former name of :meth:`FewShotTasks.from_tensor
<metagrad.tasks.fewshot.FewShotTasks.from_tensor>`, kept for existing callers."""


# --- files shared by the image data sets -------------------------------------------------------

def data_dir_candidates(root: str | os.PathLike[str] | None, subdir: str) -> list[Path]:
    """Folders that may hold a data set: ``root`` (else ``$METAGRAD_DATA``) and its ``subdir``."""
    base = root if root is not None else os.environ.get(DATA_ENV)
    if not base:
        return []
    base = Path(base).expanduser()
    return [base, base / subdir]


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``path``, else ``$METAGRAD_CACHE``, else ``~/.cache/metagrad``."""
    chosen = path if path is not None else os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "metagrad"


def source_key(files: Iterable[Path], *settings: object) -> str:
    """A short hash of the files' names, sizes and modification times and of ``settings``:
    a cache built from other files (or with other settings) gets another key."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns};".encode())
    h.update(repr(settings).encode())
    return h.hexdigest()[:16]


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see a
    half-written cache, and concurrent writers leave one complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(path: Path) -> dict[str, Any] | None:
    """A cache file's content (tensors, strings, lists only), or ``None`` if absent/unreadable."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:  # any unreadable cache is rebuilt
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
    return obj if isinstance(obj, dict) else None
