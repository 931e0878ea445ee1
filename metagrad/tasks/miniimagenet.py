"""MiniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017), as used by
MAML §5.2: 64 / 16 / 20 classes of 600 colour images, 84×84.

Two on-disk formats give the same class-indexed uint8 tensor ``[classes, items, 3, 84, 84]``:

* folder: ``images/`` plus ``train.csv`` / ``val.csv`` / ``test.csv`` (header
  ``filename,label``); images that are not 84×84 are resized with Lanczos as in Ravi &
  Larochelle's preprocessing. The decoded tensor is cached (see :func:`load_miniimagenet`).
* pickle: ``mini-imagenet-cache-{split}.pkl`` holding ``{"image_data": uint8 [N, 84, 84, 3],
  "class_dict": {label: [indices]}}``; read with an unpickler that only builds numpy arrays.

Classes are in sorted label order, items in file order. Episodes scale pixels to [0, 1]
(``uint8 / 255``) without mean/std normalisation, like the MAML reference code.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metagrad.errors import ConfigError, DataError
from metagrad.models.conv import Conv4, miniimagenet_conv
from metagrad.tasks.base import TaskSetup, task
from metagrad.tasks.episodes import (
    DATA_ENV,
    cache_dir,
    data_dir_candidates,
    load_cached,
    save_atomic,
    source_key,
)
from metagrad.tasks.fewshot import (
    CLASSIFICATION_RUN,
    ClassTensor,
    FewShotTasks,
    classification_setup,
    require_int,
)

log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "test"]
Layout = Literal["auto", "folder", "pickle"]
_CACHE_FORMAT = 1
# Globals a numpy-array pickle may name; anything else (which could run code) is refused.
_NUMPY_GLOBALS = {
    (module, name)
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                   "numpy.core.numeric", "numpy._core.numeric")
    for name in ("ndarray", "dtype", "_reconstruct", "scalar", "_frombuffer")
}


@dataclass(frozen=True, eq=False)
class MiniImageNetData:
    """One split: ``images`` uint8 ``[classes, items, 3, H, W]``; class ``c`` has ``counts[c]``
    valid items (the rest is zero padding) and label ``labels[c]`` (a WordNet ID)."""

    images: Tensor
    counts: Tensor
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return self.images.shape[0]


def load_miniimagenet(split: SplitName = "train", root: str | os.PathLike[str] | None = None, *,
                      layout: Layout = "auto", cache: str | os.PathLike[str] | None = None,
                      image_size: int = 84) -> MiniImageNetData:
    """Loads one split from ``root`` (else ``$METAGRAD_DATA``) or its ``miniimagenet/``.

    ``layout="auto"`` prefers the pickle when both are present. The decoded folder format is
    cached in ``cache`` (else ``$METAGRAD_CACHE``, else ``~/.cache/metagrad``), keyed by the CSV
    file, the images folder and ``image_size``.
    """
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown MiniImageNet split {split!r}; use 'train', 'val' or 'test'")
    if layout not in ("auto", "folder", "pickle"):
        raise ConfigError(f"layout must be 'auto', 'folder' or 'pickle', got {layout!r}")
    pkl_name, csv_name = f"mini-imagenet-cache-{split}.pkl", f"{split}.csv"
    candidates = data_dir_candidates(root, "miniimagenet")
    for folder in candidates:
        if layout in ("auto", "pickle") and (folder / pkl_name).is_file():
            return _load_pickle(folder / pkl_name)
        if layout in ("auto", "folder") and (folder / csv_name).is_file():
            return _load_folder(folder, csv_name, cache, image_size)
    where = (" or ".join(str(c) for c in candidates) if candidates
             else f"nowhere: no root was given and ${DATA_ENV} is not set")
    wanted = {"auto": f"{pkl_name} or {csv_name} with images/", "pickle": pkl_name,
              "folder": f"{csv_name} with images/"}[layout]
    raise DataError(f"MiniImageNet {split} split not found: looked for {wanted} in {where}. "
                    f"Put the files into one folder and pass it as root or set {DATA_ENV} to it "
                    "(or to its parent containing miniimagenet/)")


class MiniImageNetEpisodes(FewShotTasks):
    """N-way K-shot episodes of one split: ``support_x`` float32 ``[T, ways*shots, 3, H, W]`` in
    [0, 1], labels int64 in ``0..ways-1`` (MAML §5.2 uses 5-way, 1/5 shots, 15 queries)."""

    def __init__(self, data: MiniImageNetData, ways: int = 5, shots: int = 1,
                 queries: int = 15, *, device: torch.device | str | None = None,
                 split: str | None = None) -> None:
        part = f" {split} split" if split else ""
        super().__init__(ClassTensor(data.images, data.counts), ways, shots, queries,
                         device=device, name=f"MiniImageNet{part} ({len(data)} classes)")


# --- the ``miniimagenet`` task ------------------------------------------------------------------

@dataclass
class MiniImageNetOptions:
    """Settings of the ``miniimagenet`` task (``config.task_options``)."""

    ways: int = field(default=5, metadata={"help": "classes per task (5 in the paper)"})
    data: str | None = field(default=None, metadata={
        "help": f"folder with the MiniImageNet pickles or images/ and CSVs (default: "
                f"${DATA_ENV})"})

    def __post_init__(self) -> None:
        require_int("ways", self.ways, 2)


# MAML §5.2 and appendix A.1.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(CLASSIFICATION_RUN, ways=5, shots=1, queries=15, inner_lr=0.01,
                  inner_steps=5, meta_batch=4, eval_steps=10),
    "paper-5shot": dict(CLASSIFICATION_RUN, ways=5, shots=5, queries=15, inner_lr=0.01,
                        inner_steps=5, meta_batch=2, eval_steps=10),
}


def _default_preset(overrides: dict[str, Any]) -> str:
    """The paper's 5-shot settings when ``shots >= 5`` is asked for, else its 1-shot ones."""
    return "paper-5shot" if int(overrides.get("shots", 1)) >= 5 else "paper"


@task(options=MiniImageNetOptions, presets=PRESETS, default_preset=_default_preset)
def miniimagenet_task(config: Any) -> TaskSetup:
    """MiniImageNet episodes (MAML §5.2) with the Ravi & Larochelle split: ``config.shots`` and
    ``config.queries`` per class for meta-training, ``config.eval_queries`` (else ``queries``)
    queries held out. All three splits are loaded here, so that settings the data cannot
    satisfy are refused before training."""
    opts: MiniImageNetOptions = config.task_options
    eval_queries = config.eval_queries or config.queries
    episodes = {s: MiniImageNetEpisodes(load_miniimagenet(s, opts.data), opts.ways, config.shots,
                                        config.queries if s == "train" else eval_queries,
                                        device=config.device, split=s)
                for s in ("train", "val", "test")}

    def make_model() -> Conv4:
        size = episodes["train"].images.shape[-1]
        return miniimagenet_conv(opts.ways, size)

    return classification_setup(episodes, make_model)


def _class_tensor(groups: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """``[classes, max items, 3, H, W]`` from per-class ``[n, H, W, 3]`` arrays (zero padded)."""
    counts = torch.tensor([len(g) for g in groups], dtype=torch.int64)
    h, w = groups[0].shape[1:3]
    out = torch.zeros(len(groups), int(counts.max()), 3, h, w, dtype=torch.uint8)
    for c, g in enumerate(groups):
        out[c, :len(g)] = torch.from_numpy(np.ascontiguousarray(g)).permute(0, 3, 1, 2)
    return out, counts


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> MiniImageNetData:
    start = time.perf_counter()
    try:
        with path.open("rb") as f:
            # latin1 reads the pickles written by Python 2 as well.
            obj = _NumpyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError,
            AttributeError, ImportError, IndexError) as e:
        raise DataError(f"{path} is not a readable MiniImageNet pickle ({e}); replace it with "
                        "the original mini-imagenet-cache file or use the images/ + CSV "
                        "layout") from e
    fix = "replace it with a file holding {'image_data': uint8 [N, H, W, 3], 'class_dict': " \
          "{label: [indices]}}"
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= obj.keys():
        raise DataError(f"{path} lacks 'image_data' / 'class_dict'; {fix}")
    images, class_dict = obj["image_data"], obj["class_dict"]
    if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
            or images.shape[3] != 3):
        raise DataError(f"{path}: image_data must be uint8 [N, H, W, 3], got "
                        f"{getattr(images, 'dtype', type(images))} "
                        f"{getattr(images, 'shape', '')}; {fix}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: class_dict must be a non-empty dict; {fix}")
    labels = sorted(class_dict, key=str)
    groups = []
    for label in labels:
        idx = np.asarray(class_dict[label], dtype=np.int64)
        if idx.ndim != 1 or not len(idx) or idx.min() < 0 or idx.max() >= len(images):
            raise DataError(f"{path}: class {label} lists no or out-of-range image indices "
                            f"(image_data has {len(images)} images); {fix}")
        groups.append(images[idx])
    tensor, counts = _class_tensor(groups)
    log.info("loaded %s in %.1f s", path, time.perf_counter() - start)
    return MiniImageNetData(tensor, counts, tuple(str(lb) for lb in labels))


def _load_folder(folder: Path, csv_name: str, cache: str | os.PathLike[str] | None,
                 size: int) -> MiniImageNetData:
    csv_path, image_dir = folder / csv_name, folder / "images"
    if not image_dir.is_dir():
        raise DataError(f"{csv_path} exists but {image_dir} does not; put the MiniImageNet "
                        "images into images/ next to the CSV files")
    key = source_key([csv_path, image_dir], _CACHE_FORMAT, size)
    path = cache_dir(cache) / f"miniimagenet-{csv_path.stem}-{size}px-{key}.pt"
    start = time.perf_counter()
    stored = load_cached(path)
    if stored is not None and stored.get("format") == _CACHE_FORMAT:
        log.info("loaded MiniImageNet from %s in %.2f s", path, time.perf_counter() - start)
        return MiniImageNetData(stored["images"], stored["counts"], tuple(stored["labels"]))
    by_label: dict[str, list[str]] = {}
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) != ["filename", "label"]:
            raise DataError(f"{csv_path} must start with the header 'filename,label'; use the "
                            "split files of Ravi & Larochelle (2017)")
        for row in reader:
            if len(row) != 2:
                raise DataError(f"{csv_path}, line {reader.line_num}: expected "
                                f"'filename,label', got {row}")
            by_label.setdefault(row[1], []).append(row[0])
    if not by_label:
        raise DataError(f"{csv_path} lists no images; use the split files of Ravi & Larochelle")
    labels = sorted(by_label)
    groups = [np.stack([_read_image(image_dir / name, size) for name in by_label[label]])
              for label in labels]
    tensor, counts = _class_tensor(groups)
    data = MiniImageNetData(tensor, counts, tuple(labels))
    save_atomic({"format": _CACHE_FORMAT, "images": data.images, "counts": data.counts,
                 "labels": list(labels)}, path)
    log.info("decoded MiniImageNet from %s in %.1f s into %s", csv_path,
             time.perf_counter() - start, path)
    return data


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read MiniImageNet image {path} ({e}); restore the file or "
                        "remove its line from the CSV") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)
