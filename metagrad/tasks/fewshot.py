"""N-way K-shot classification episodes over any labelled data set (Vinyals et al. 2016; MAML §5.2).

:class:`FewShotTasks` turns a map-style data set of ``(x, label)`` items into a
:class:`~metagrad.core.taskbatch.TaskBatch` sampler: an episode is ``ways`` distinct classes,
each with ``shots`` support and ``queries`` query items drawn without replacement (support and
query never share an item), the classes relabelled ``0..ways-1`` in a fresh random order per
episode. Omniglot, MiniImageNet and the ``folder`` task (a user's own images, one sub-folder per
class) are instances of it.

Two ways of reading items, one sampling mechanism:

* without a transform the items are read once into a class-indexed tensor
  (:class:`ClassTensor`, ``[classes, items, *x_shape]``) and episodes are gathered from it,
  vectorised over tasks (no per-item Python work);
* with a transform each sampled item is read and transformed when its episode is drawn (a fresh
  augmentation every time), for data sets that do not fit in memory or need augmentation.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from metagrad.core.taskbatch import TaskBatch
from metagrad.errors import ConfigError, DataError
from metagrad.models.conv import Conv4
from metagrad.tasks.base import SPLITS, TaskSetup, task

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

Transform = Callable[[Any], Any]
"""``transform(x) -> Tensor | PIL.Image``, applied to each item's ``x`` when sampled."""


class EpisodeIndices(NamedTuple):
    """Which items make up a batch of episodes (all int64).

    ``classes[t, j]`` is the class given label ``j`` in task ``t``; ``support[t, j]`` /
    ``query[t, j]`` are item indices within that class."""

    classes: Tensor  # [tasks, ways]
    support: Tensor  # [tasks, ways, shots]
    query: Tensor  # [tasks, ways, queries]


class ClassTensor(Dataset):
    """Items stored by class: ``images[class, item, *x_shape]``, of which the first ``counts[c]``
    (default: all) of class ``c`` are valid and the rest is padding.

    As a data set, item ``k`` is ``(images[c, i], c)`` for the ``k``-th valid item in class
    order; :class:`FewShotTasks` without a transform samples from the tensor directly.
    """

    def __init__(self, images: Tensor, counts: Tensor | Sequence[int] | None = None) -> None:
        if not isinstance(images, Tensor) or images.dim() < 2:
            raise DataError(f"class-indexed items must be a tensor [classes, items, ...], got "
                            f"{type(images).__name__} of shape "
                            f"{tuple(getattr(images, 'shape', ()))}")
        num_classes, max_items = images.shape[:2]
        counts = (torch.full((num_classes,), max_items, dtype=torch.int64) if counts is None
                  else torch.as_tensor(counts, dtype=torch.int64))
        if counts.shape != (num_classes,) or bool((counts > max_items).any()):
            raise DataError(f"counts must be [classes] = [{num_classes}] with values <= "
                            f"{max_items} items, got {tuple(counts.shape)}")
        self.images = images
        self.counts = counts
        self._starts = counts.cumsum(0) - counts

    @property
    def targets(self) -> list[int]:
        return torch.arange(len(self.counts)).repeat_interleave(self.counts).tolist()

    def __len__(self) -> int:
        return int(self.counts.sum())

    def __getitem__(self, k: int) -> tuple[Tensor, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"item {k} of {len(self)}")
        c = int(torch.searchsorted(self._starts, k, right=True)) - 1
        return self.images[c, k - int(self._starts[c])], c


class ImageFolder(Dataset):
    """Images in ``root/<class name>/<file>``: item ``k`` is ``(PIL image, label)``.

    Classes are the sub-folders holding at least one image (suffixes in :data:`IMAGE_SUFFIXES`,
    hidden files ignored), in sorted name order, labelled ``0, 1, ...``; files are in sorted
    order within a class. Images are converted to grey (``channels=1``) or RGB (``3``) and, with
    ``image_size``, resized to ``image_size × image_size`` (Lanczos). Raises :class:`DataError`
    for a missing or empty folder, and when an image cannot be decoded (on access).
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int | None = None,
                 channels: int = 3) -> None:
        self.root = Path(root).expanduser()
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; give a folder with one sub-folder of "
                            "images per class")
        self.image_size, self.channels = image_size, channels
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for folder in sorted(d for d in self.root.iterdir()
                             if d.is_dir() and not d.name.startswith(".")):
            files = sorted(f for f in folder.iterdir() if f.is_file()
                           and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                log.warning("%s holds no images; it is not a class", folder)
                continue
            self.samples += [(f, len(self.classes)) for f in files]
            self.classes.append(folder.name)
        if not self.samples:
            raise DataError(f"{self.root} holds no images: expected one sub-folder per class, "
                            f"each with image files ({', '.join(sorted(IMAGE_SUFFIXES))})")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> tuple[Image.Image, int]:
        path, label = self.samples[k]
        try:
            with Image.open(path) as img:
                out = img.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} ({e}); replace or delete the file") from e
        if self.image_size is not None and out.size != (self.image_size, self.image_size):
            out = out.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        return out, label


class FewShotTasks:
    """Samples N-way K-shot episodes from ``dataset`` (map-style, item ``k`` is ``(x, label)``).

    ``x`` is a tensor or a PIL image (read as uint8 ``[channels, H, W]``), after ``transform``
    when one is given; labels are integers (any values: the classes are the distinct labels in
    increasing order, listed in :attr:`class_labels`). The class index is built once, from
    ``dataset.targets`` when present, else from one pass over the items.

    :meth:`sample` returns ``support_x`` ``[tasks, ways*shots, *x_shape]`` and ``query_x``
    ``[tasks, ways*queries, *x_shape]`` on ``device``, uint8 inputs as float32 in [0, 1]
    (``/ 255``) and other dtypes unchanged; labels int64 ``0..ways-1``, assigned to the sampled
    classes in a fresh random order per episode, each set ordered by label. The result is a
    function of the generator alone (apart from any randomness inside ``transform``).

    Without ``transform`` all items are read at construction into one class-indexed tensor
    (they must share one shape and dtype) kept on ``device``; with one, items are read when
    sampled (pass an identity transform to keep a large data set out of memory).

    Raises :class:`ConfigError` when ``ways`` exceeds the classes or ``shots + queries`` the
    items of the smallest class, and :class:`DataError` for an empty data set, labels that are
    not integers, and items that are neither tensors nor PIL images or differ in shape.
    """

    def __init__(self, dataset: Dataset, ways: int, shots: int, queries: int,
                 transform: Transform | None = None, *,
                 device: torch.device | str | None = None, name: str = "data set") -> None:
        self.name = name
        self.dataset = dataset
        self.transform = transform
        self.device = torch.device(device if device is not None else "cpu")
        self.images: Tensor | None
        if transform is not None:
            items, self.counts, labels = _class_index(_labels(dataset, name))
            self.images, self._items = None, items
        else:
            store, labels = ((dataset, list(range(len(dataset.counts))))
                             if isinstance(dataset, ClassTensor) else _read_all(dataset, name))
            self.images, self._items, self.counts = store.images.to(self.device), None, store.counts
        self.class_labels: tuple[int, ...] = tuple(labels)
        # Items per class as stored (padding included): the width of the random draw per class.
        self._width = (self._items if self.images is None else self.images).shape[1]
        self._padded = bool((self.counts < self._width).any())
        self._set_episode(ways, shots, queries)

    @classmethod
    def from_tensor(cls, images: Tensor, ways: int, shots: int, queries: int,
                    counts: Tensor | Sequence[int] | None = None, *,
                    device: torch.device | str | None = None,
                    name: str = "data set") -> FewShotTasks:
        """Episodes from items already stored by class: ``images[class, item, *x_shape]`` with
        ``counts[c]`` valid items in class ``c`` (see :class:`ClassTensor`)."""
        return cls(ClassTensor(images, counts), ways, shots, queries, device=device, name=name)

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str], ways: int, shots: int, queries: int,
                    transform: Transform | None = None, image_size: int | None = None,
                    channels: int = 3, *,
                    device: torch.device | str | None = None) -> FewShotTasks:
        """Episodes from ``root/<class>/<image>`` (see :class:`ImageFolder`). Without
        ``transform`` the images are decoded once and must share one size (set
        ``image_size``); with one, each sampled image reaches it as a PIL image."""
        return cls(ImageFolder(root, image_size, channels), ways, shots, queries, transform,
                   device=device, name=f"image folder {Path(root)}")

    def _set_episode(self, ways: int, shots: int, queries: int) -> None:
        for arg, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{self.name}: {arg} must be a positive integer, got "
                                  f"{value!r}; set {arg} >= 1")
        if ways > self.num_classes:
            raise ConfigError(f"{self.name}: {ways}-way episodes need {ways} classes but only "
                              f"{self.num_classes} are available; lower ways to at most "
                              f"{self.num_classes} or use a larger split")
        fewest = int(self.counts.min())
        if shots + queries > fewest:
            smallest = self.class_labels[int(self.counts.argmin())]
            raise ConfigError(f"{self.name}: shots + queries = {shots} + {queries} = "
                              f"{shots + queries} items per class, but some classes have only "
                              f"{fewest} (e.g. class {smallest}); lower shots or queries so "
                              f"that shots + queries <= {fewest}")
        self.ways, self.shots, self.queries = ways, shots, queries

    def replace(self, *, ways: int | None = None, shots: int | None = None,
                queries: int | None = None) -> FewShotTasks:
        """The same data with other episode sizes (shares the stored items; checked again)."""
        other = copy.copy(self)
        other._set_episode(self.ways if ways is None else ways,
                           self.shots if shots is None else shots,
                           self.queries if queries is None else queries)
        return other

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> EpisodeIndices:
        """Classes (without replacement per task) and disjoint support/query items per class."""
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ConfigError(f"{self.name}: num_tasks must be >= 1, got {num_tasks}")
        # The ``ways`` smallest of i.i.d. uniform keys: a uniformly random ordered subset.
        class_keys = torch.rand(num_tasks, self.num_classes, generator=generator)
        classes = class_keys.topk(self.ways, dim=1, largest=False).indices
        item_keys = torch.rand(num_tasks, self.ways, self._width, generator=generator)
        if self._padded:
            valid = torch.arange(self._width) < self.counts[classes].unsqueeze(-1)
            item_keys = item_keys.masked_fill(~valid, 2.0)  # keys are < 1: padding sorts last
        items = item_keys.topk(self.shots + self.queries, dim=2, largest=False).indices
        return EpisodeIndices(classes, items[..., :self.shots], items[..., self.shots:])

    def batch(self, indices: EpisodeIndices) -> TaskBatch:
        """Gathers the items of ``indices`` into a :class:`TaskBatch` on :attr:`device`."""
        tasks = indices.classes.shape[0]
        classes = indices.classes.unsqueeze(-1)

        def gather(items: Tensor) -> Tensor:
            if self.images is not None:
                dev = self.images.device
                x = self.images[classes.to(dev), items.to(dev)]  # [tasks, ways, k, *x_shape]
            else:
                x = self._read(self._items[classes, items])
            x = x.reshape(tasks, -1, *x.shape[3:])
            return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x

        def labels(k: int) -> Tensor:
            return torch.arange(self.ways, device=self.device).repeat_interleave(k).repeat(tasks, 1)

        return TaskBatch(gather(indices.support), labels(self.shots),
                         gather(indices.query), labels(self.queries))

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` episodes drawn with ``generator`` (see the class docstring)."""
        return self.batch(self.sample_indices(num_tasks, generator))

    def _read(self, ids: Tensor) -> Tensor:
        """Items ``ids`` (dataset indices, any shape) read and transformed, stacked on device."""
        assert self.transform is not None
        xs = []
        for k in ids.flatten().tolist():
            x = _as_tensor(self.transform(self.dataset[k][0]), k, self.name, "the transform of ")
            if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
                raise DataError(f"{self.name}: the transform gave item {k} shape "
                                f"{tuple(x.shape)} {x.dtype} but others {tuple(xs[0].shape)} "
                                f"{xs[0].dtype}; make it return one size and dtype")
            xs.append(x)
        return torch.stack(xs).reshape(*ids.shape, *xs[0].shape).to(self.device)


# --- reading a data set once --------------------------------------------------------------------

def _as_tensor(x: Any, k: int, name: str, what: str = "") -> Tensor:
    """An item's input as a tensor; PIL images become uint8 ``[channels, H, W]``."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Image.Image):
        if x.mode not in ("L", "RGB", "RGBA"):
            x = x.convert("L" if x.mode in ("1", "I", "I;16", "F") else "RGB")
        a = np.asarray(x, dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a.copy()).permute(2, 0, 1)
    raise DataError(f"{name}: {what}item {k} is a {type(x).__name__}; items must be tensors or "
                    "PIL images (pass a transform that makes them tensors)")


def _as_label(y: Any, k: int, name: str) -> int:
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() \
            and not y.is_complex() and y.dtype != torch.bool:
        return int(y)
    if isinstance(y, int | np.integer) and not isinstance(y, bool | np.bool_):
        return int(y)
    raise DataError(f"{name}: item {k} has label {y!r} ({type(y).__name__}); labels must be "
                    "integers (class indices): map class names to integers, e.g. with a dict")


def _labels(dataset: Dataset, name: str) -> list[int]:
    """Every item's label: ``dataset.targets`` when present, else one pass over the items."""
    n = _length(dataset, name)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[k][1] for k in range(n)]
    elif len(targets) != n:
        raise DataError(f"{name}: dataset.targets has {len(targets)} labels for {n} items")
    if isinstance(targets, Tensor | np.ndarray):
        targets = targets.tolist()
    return [_as_label(y, k, name) for k, y in enumerate(targets)]


def _length(dataset: Dataset, name: str) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(f"{name}: the data set has no length; FewShotTasks needs a map-style "
                        "data set (__len__ and __getitem__)") from e
    if n == 0:
        raise DataError(f"{name}: the data set is empty")
    return n


def _class_index(labels: list[int]) -> tuple[Tensor, Tensor, list[int]]:
    """``items[class, j]``: the dataset index of the ``j``-th item of each class (padded with
    the class's first item), ``counts[class]`` and the label of each class."""
    label_t = torch.tensor(labels, dtype=torch.int64)
    classes, inverse, counts = torch.unique(label_t, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(labels)) - starts[inverse[order]]
    items = order[starts].unsqueeze(1).repeat(1, int(counts.max()))
    items[inverse[order], position] = order
    return items, counts, classes.tolist()


def _read_all(dataset: Dataset, name: str) -> tuple[ClassTensor, list[int]]:
    """All items in one class-indexed tensor (one pass over the data set), and the label of
    each class."""
    xs, labels = [], []
    for k in range(_length(dataset, name)):
        x, y = dataset[k]
        x = _as_tensor(x, k, name)
        if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
            raise DataError(f"{name}: item {k} has shape {tuple(x.shape)} {x.dtype} but item 0 "
                            f"{tuple(xs[0].shape)} {xs[0].dtype}; without a transform all items "
                            "need one shape and dtype (resize them, e.g. image_size= for "
                            "from_folder, or pass a transform)")
        xs.append(x)
        labels.append(_as_label(y, k, name))
    items, counts, class_labels = _class_index(labels)
    return ClassTensor(torch.stack(xs)[items], counts), class_labels


# --- tasks: shared by the image data sets -------------------------------------------------------

CLASSIFICATION_RUN: dict[str, Any] = dict(
    meta_lr=1e-3, iterations=60000, eval_queries=15, baseline=False, val_every=500,
    val_tasks=200, checkpoint_every=250)
"""Run settings shared by the paper's classification presets (60,000 iterations, MAML §5.2)."""


def require_int(setting: str, value: object, low: int) -> None:
    """:class:`ConfigError` naming ``setting`` unless ``value`` is an integer >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{setting} must be an integer >= {low}, got {value!r}")


def require_choice(setting: str, value: object, choices: Sequence[object]) -> None:
    """:class:`ConfigError` naming ``setting`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{setting} must be one of {', '.join(map(repr, choices))}, "
                          f"got {value!r}")


def classification_setup(splits: dict[str, FewShotTasks], make_model: Callable[[], Any],
                         artifacts: dict[str, Any] | None = None) -> TaskSetup:
    """The :class:`TaskSetup` of episodes with one sampler per split (``"train"``, ``"val"``,
    ``"test"``): ``held_out(split, shots)`` is that split's sampler with ``shots`` shots
    (built once per pair, sharing the split's items); for ``"train"`` (the meta-training
    classes, to measure the gap to unseen ones) with the held-out splits' number of queries."""

    @functools.cache
    def held_out(split: str, shots: int) -> FewShotTasks:
        require_choice("split", split, SPLITS)
        queries = splits["test"].queries if split == "train" else None
        return splits[split].replace(shots=shots, queries=queries)

    return TaskSetup(splits["train"], held_out, "accuracy", make_model,
                     classes=splits["train"].ways, artifacts=dict(artifacts or {}))


# --- the ``folder`` task: the user's own images -------------------------------------------------

@dataclass
class FolderOptions:
    """Settings of the ``folder`` task (``config.task_options``)."""

    data: str | None = field(default=None, metadata={
        "help": "(required) folder with train/, val/ and test/, each with one sub-folder of "
                "images per class"})
    ways: int = field(default=5, metadata={"help": "classes per task"})
    image_size: int = field(default=28, metadata={
        "help": "images are resized to image_size x image_size pixels"})
    channels: int = field(default=3, metadata={"help": "1 (grey) or 3 (RGB)"})
    model: str = field(default="conv", metadata={
        "help": "conv: four 3x3 convolutions with 64 filters (stride 2), as for Omniglot"})

    def __post_init__(self) -> None:
        require_int("ways", self.ways, 2)
        require_int("image_size", self.image_size, 4)
        require_choice("channels", self.channels, (1, 3))
        require_choice("model", self.model, ("conv",))


@task(options=FolderOptions)
def folder_task(config: Any) -> TaskSetup:
    """Few-shot classification of the user's images: ``config.task_options.data`` holds
    ``train/``, ``val/`` and ``test/``, each with one sub-folder of images per class (see
    :class:`ImageFolder`). Meta-training episodes have ``config.shots`` and ``config.queries``
    items per class, held-out ones ``config.eval_queries`` (else ``queries``) queries. All
    three splits are decoded here, so that settings the data cannot satisfy are refused before
    training. Artifact ``classes.json``: the class folder names of each split."""
    opts: FolderOptions = config.task_options
    if not opts.data:
        raise ConfigError("the folder task needs data=FOLDER: a folder with train/, val/ and "
                          "test/, each with one sub-folder of images per class")
    root = Path(opts.data).expanduser()
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise ConfigError(f"data={opts.data}: {root} lacks the sub-folders "
                          f"{', '.join(s + '/' for s in missing)}; it needs train/, val/ and "
                          "test/, each with one sub-folder of images per class")
    eval_queries = config.eval_queries or config.queries
    splits = {s: FewShotTasks.from_folder(root / s, opts.ways, config.shots,
                                          config.queries if s == "train" else eval_queries,
                                          image_size=opts.image_size, channels=opts.channels,
                                          device=config.device)
              for s in SPLITS}

    def make_model() -> Conv4:
        return Conv4(opts.channels, opts.ways, hidden=64, pooling="stride",
                     input_size=opts.image_size)

    classes = {s: list(tasks.dataset.classes) for s, tasks in splits.items()}
    return classification_setup(splits, make_model, {"classes.json": classes})
