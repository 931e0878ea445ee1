"""N-way K-shot episodes drawn from a class-indexed image tensor (Vinyals et al. 2016; MAML §5.2).

One mechanism serves every image data set (Omniglot, MiniImageNet): the data set is a uint8
tensor ``images[class, item, *x_shape]`` and an episode is ``ways`` distinct classes, each with
``shots`` support and ``queries`` query items drawn without replacement, so support and query
never share an item. Sampling is vectorised over tasks (no per-image Python work).

The module also holds the small file helpers the image data sets share: where data and caches
live (``METAGRAD_DATA``, ``METAGRAD_CACHE``) and atomic, source-keyed cache files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError, DataError

DATA_ENV = "METAGRAD_DATA"
CACHE_ENV = "METAGRAD_CACHE"

log = logging.getLogger(__name__)


class EpisodeIndices(NamedTuple):
    """Which items make up a batch of episodes (all int64).

    ``classes[t, j]`` is the class given label ``j`` in task ``t``; ``support[t, j]`` /
    ``query[t, j]`` are item indices within that class."""

    classes: Tensor  # [tasks, ways]
    support: Tensor  # [tasks, ways, shots]
    query: Tensor  # [tasks, ways, queries]


class EpisodeSampler:
    """Samples N-way K-shot episodes from ``images``: uint8 ``[classes, items, *x_shape]``.

    ``counts[c]`` (default: all ``items``) is the number of valid items of class ``c``; the
    rest is padding and never sampled. Inputs come out as float32 in [0, 1] (``uint8 / 255``);
    labels are ``0..ways-1``, assigned to the sampled classes in a fresh random order per
    episode, and both sets are ordered by label (``shots`` or ``queries`` items per label).
    """

    def __init__(self, images: Tensor, ways: int, shots: int, queries: int,
                 counts: Tensor | None = None, name: str = "data set") -> None:
        if images.dtype != torch.uint8 or images.dim() < 2:
            raise DataError(f"{name}: episode images must be a uint8 tensor [classes, items, ...], "
                            f"got {images.dtype} of shape {tuple(images.shape)}; store pixels "
                            "as uint8 0..255")
        for arg, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {arg} must be a positive integer, got {value!r}; "
                                  f"set {arg} >= 1")
        num_classes, max_items = images.shape[:2]
        if counts is None:
            counts = torch.full((num_classes,), max_items, dtype=torch.int64)
        counts = torch.as_tensor(counts, dtype=torch.int64)
        if counts.shape != (num_classes,) or bool((counts > max_items).any()):
            raise DataError(f"{name}: counts must be [classes] with values <= {max_items} items")
        if ways > num_classes:
            raise DataError(f"{name}: {ways}-way episodes need {ways} classes but only "
                            f"{num_classes} are available; lower ways to at most {num_classes} "
                            "or use a larger split")
        needed = shots + queries
        fewest = int(counts.min()) if num_classes else 0
        if needed > fewest:
            raise DataError(f"{name}: shots + queries = {shots} + {queries} = {needed} items per "
                            f"class, but some classes have only {fewest}; lower shots or queries "
                            f"so that shots + queries <= {fewest}")
        self.images = images
        self.counts = counts
        self.ways, self.shots, self.queries = ways, shots, queries
        self.name = name
        # Padding only exists when counts differ from the tensor's item dimension.
        self._padded = bool((counts < max_items).any())

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> EpisodeIndices:
        """Classes (without replacement per task) and disjoint support/query items per class."""
        if num_tasks < 1:
            raise ConfigError(f"{self.name}: num_tasks must be >= 1, got {num_tasks}")
        # The ``ways`` smallest of i.i.d. uniform keys: a uniformly random ordered subset.
        class_keys = torch.rand(num_tasks, self.num_classes, generator=generator)
        classes = class_keys.topk(self.ways, dim=1, largest=False).indices
        item_keys = torch.rand(num_tasks, self.ways, self.images.shape[1], generator=generator)
        if self._padded:
            valid = torch.arange(self.images.shape[1]) < self.counts[classes].unsqueeze(-1)
            item_keys = item_keys.masked_fill(~valid, 2.0)  # keys are < 1: padding sorts last
        items = item_keys.topk(self.shots + self.queries, dim=2, largest=False).indices
        return EpisodeIndices(classes, items[..., :self.shots], items[..., self.shots:])

    def batch(self, indices: EpisodeIndices) -> TaskBatch:
        """Gathers the images of ``indices`` into a :class:`TaskBatch`."""
        tasks = indices.classes.shape[0]
        x_shape = self.images.shape[2:]

        def gather(items: Tensor) -> Tensor:
            x = self.images[indices.classes.unsqueeze(-1), items]  # [tasks, ways, k, *x_shape]
            return x.reshape(tasks, -1, *x_shape).to(torch.float32).div_(255.0)

        def labels(k: int) -> Tensor:
            return torch.arange(self.ways).repeat_interleave(k).repeat(tasks, 1)

        return TaskBatch(gather(indices.support), labels(self.shots),
                         gather(indices.query), labels(self.queries))

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``support_x`` ``[T, ways*shots, *x_shape]``, ``query_x`` ``[T, ways*queries, ...]``
        (float32 in [0, 1]); labels int64 ``[T, ways*shots]`` / ``[T, ways*queries]``."""
        return self.batch(self.sample_indices(num_tasks, generator))


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
