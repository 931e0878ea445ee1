"""Omniglot few-shot classification (Lake et al. 2015) as used by MAML §5.2 (Finn et al. 2017).

* :func:`load_omniglot` reads the official ``images_background.zip`` (964 characters) and
  ``images_evaluation.zip`` (659 characters), 20 drawings each, and decodes them once into a
  cached uint8 tensor ``[1623, 20, 28, 28]`` in official character-ID order (ID ``i`` at index
  ``i - 1``), **255 = ink**: like the MAML reference code, pixels are inverted so that strokes
  are 1 and the background 0 once scaled to [0, 1].
* :class:`OmniglotSplits` is the character split: the ``paper`` protocol (1200 random
  characters for meta-training, a validation part carved out of them, 423 for testing) or the
  ``background`` protocol (background alphabets vs evaluation alphabets).
* :class:`OmniglotEpisodes` samples N-way K-shot episodes of one split; with ``rotations`` each
  character at 0°, 90°, 180° and 270° is its own class (Santoro et al. 2016). Splitting happens
  per character before rotating, so no character appears in two splits in any rotation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from metagrad.errors import ConfigError, DataError
from metagrad.models.conv import omniglot_conv
from metagrad.models.mlp import omniglot_mlp
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
    require_choice,
    require_int,
)

log = logging.getLogger(__name__)

NUM_BACKGROUND = 964
NUM_EVALUATION = 659
NUM_CHARACTERS = NUM_BACKGROUND + NUM_EVALUATION
DRAWINGS = 20
SOURCE_SIZE = 105
ROTATIONS = (0, 90, 180, 270)
ZIPS = ("images_background.zip", "images_evaluation.zip")
# The official archives (github.com/brendenlake/omniglot, folder python/) and their md5 sums.
OFFICIAL_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OFFICIAL_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
SUMS_FILE = "SHA256SUMS"
"""What a mirror whose archives are re-encodings (other bytes, same pixels) publishes next to
them: ``sha256sum`` lines, accepted in place of the official md5 (:func:`checksum_problem`)."""
_CACHE_FORMAT = 1
_PNG = re.compile(r"images_(background|evaluation)/([^/]+)/character\d+/(\d{4})_(\d{2})\.png")

Resample = Literal["lanczos", "nearest"]
SplitName = Literal["train", "val", "test"]


@dataclass(frozen=True, eq=False)
class OmniglotData:
    """All 1623 characters: ``images`` uint8 ``[1623, 20, S, S]`` (255 = ink), the alphabet of
    each character and whether it belongs to the background set. Index ``i`` holds the
    character with official ID ``i + 1``."""

    images: Tensor
    alphabets: tuple[str, ...]
    background: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def load_omniglot(root: str | os.PathLike[str] | None = None, *,
                  cache: str | os.PathLike[str] | None = None, download: bool = False,
                  resample: Resample = "lanczos", image_size: int = 28) -> OmniglotData:
    """Loads Omniglot, decoding the zips on first use and reading the cache afterwards.

    ``root`` (else ``$METAGRAD_DATA``) is the folder holding the two zips or its parent holding
    ``omniglot/``. ``cache`` (else ``$METAGRAD_CACHE``, else ``~/.cache/metagrad``) holds the
    decoded tensor, keyed by the zips' sizes and modification times and by the settings.
    ``resample="lanczos"`` resizes 105→``image_size`` with a Lanczos filter on the grey-level
    image; ``"nearest"`` reproduces the reference code's files exactly (it asked Pillow for
    LANCZOS, which Pillow replaces by NEAREST for 1-bit images). ``download=True`` fetches the
    official zips if they are missing (into ``root``, else ``$METAGRAD_DATA/omniglot``, else
    the cache folder).
    """
    if resample not in ("lanczos", "nearest"):
        raise ConfigError(f"resample must be 'lanczos' or 'nearest', got {resample!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    folder = find_omniglot(root, download=download, cache=cache)
    zips = [folder / name for name in ZIPS]
    path = cache_path(folder, cache, resample, image_size)
    start = time.perf_counter()
    stored = load_cached(path)
    if stored is not None and _valid_cache(stored, image_size):
        log.info("loaded Omniglot from %s in %.2f s", path, time.perf_counter() - start)
        return OmniglotData(stored["images"], tuple(stored["alphabets"]), stored["background"])
    data = _decode(zips, resample, image_size)
    save_atomic({"format": _CACHE_FORMAT, "images": data.images, "alphabets": list(data.alphabets),
                 "background": data.background}, path)
    log.info("decoded Omniglot from %s in %.1f s into %s", folder, time.perf_counter() - start,
             path)
    return data


def cache_path(folder: Path, cache: str | os.PathLike[str] | None = None,
               resample: Resample = "lanczos", image_size: int = 28) -> Path:
    """Where :func:`load_omniglot` keeps the decoded zips of ``folder`` (the key changes with
    the zips' sizes and modification times and with the settings)."""
    key = source_key([folder / name for name in ZIPS], _CACHE_FORMAT, resample, image_size)
    return cache_dir(cache) / f"omniglot-{image_size}px-{resample}-{key}.pt"


def find_omniglot(root: str | os.PathLike[str] | None = None, *, download: bool = False,
                  cache: str | os.PathLike[str] | None = None,
                  base_url: str = OFFICIAL_BASE_URL) -> Path:
    """The folder holding both Omniglot zips (see :func:`load_omniglot` for where it looks);
    with ``download``, missing zips are fetched from ``base_url`` (:func:`download_omniglot`)."""
    candidates = data_dir_candidates(root, "omniglot")
    for folder in candidates:
        if all((folder / name).is_file() for name in ZIPS):
            return folder
    if download:
        # Into root itself, else into $METAGRAD_DATA/omniglot, else into the cache folder.
        target = (candidates[0] if root is not None else candidates[-1] if candidates
                  else cache_dir(cache) / "omniglot")
        download_omniglot(target, base_url=base_url)
        return target
    where = (" or ".join(str(c) for c in candidates) if candidates
             else f"nowhere: no root was given and ${DATA_ENV} is not set")
    raise DataError(
        f"Omniglot not found: looked for {' and '.join(ZIPS)} in {where}. Put both zips (from "
        f"github.com/brendenlake/omniglot, folder python/) into one folder and pass it as root "
        f"or set {DATA_ENV} to it (or to its parent containing omniglot/); or fetch and check "
        f"them with `metagrad data omniglot --root DIR --download {OFFICIAL_BASE_URL}`")


def download_omniglot(folder: str | os.PathLike[str], timeout: float = 60.0,
                      base_url: str = OFFICIAL_BASE_URL) -> None:
    """Downloads the two zips missing from ``folder`` from ``base_url`` (any URL urllib opens,
    ``file://`` too), each accepted when :func:`checksum_problem` finds none (the mirror's
    ``SHA256SUMS`` at ``base_url``, if any, is fetched and kept in ``folder``); a
    :class:`~metagrad.errors.DataError` on any failure, leaving no partial file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    published = _fetch_sums(f"{base}/{SUMS_FILE}", timeout)
    for name in ZIPS:
        target = folder / name
        if target.is_file():
            continue
        url = f"{base}/{name}"
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=folder)
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    md5.update(chunk)
                    sha256.update(chunk)
                    out.write(chunk)
            problem = checksum_problem(name, md5.hexdigest(), sha256.hexdigest(), published)
            if problem:
                raise DataError(f"downloaded {url} {problem}; retry, or download it by hand to "
                                f"{target}")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(f"could not download {url} ({e}); without network access, download "
                            f"it elsewhere and put it at {target}") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
    if published:
        (folder / SUMS_FILE).write_text("".join(f"{published[n]}  {n}\n" for n in ZIPS
                                                if n in published))


def checksum_problem(name: str, md5: str, sha256: str, published: dict[str, str]) -> str:
    """Why zip ``name`` with these digests is not accepted, or ``""``: it must have its official
    md5 (:data:`OFFICIAL_MD5`) or, for a mirror that re-encodes the archives (pixels identical,
    bytes not), the sha256 the mirror's ``SHA256SUMS`` lists (``published``)."""
    if md5 == OFFICIAL_MD5[name] or published.get(name) == sha256:
        return ""
    listed = (f", and sha256 {sha256}, not the {published[name]} its {SUMS_FILE} lists"
              if name in published else "")
    return f"has md5 {md5}, not the official {OFFICIAL_MD5[name]}{listed}"


def check_omniglot(folder: str | os.PathLike[str]) -> None:
    """Both zips are in ``folder`` and pass :func:`checksum_problem` (with the ``SHA256SUMS``
    in ``folder``, if any); else a :class:`~metagrad.errors.DataError` naming the file and what
    to do. (Decoding them, :func:`load_omniglot`, checks their contents.)"""
    folder = Path(folder)
    sums = folder / SUMS_FILE
    published = _parse_sums(sums.read_text()) if sums.is_file() else {}
    for name in ZIPS:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; put the official {name} there (or fetch it "
                            "with --download URL)")
        md5, sha256 = hashlib.md5(), hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                md5.update(chunk)
                sha256.update(chunk)
        problem = checksum_problem(name, md5.hexdigest(), sha256.hexdigest(), published)
        if problem:
            raise DataError(f"{path} {problem} (damaged or not the official archive); delete "
                            "it and fetch it again")


def _parse_sums(text: str) -> dict[str, str]:
    """``name -> sha256`` from ``sha256sum`` output (``HEX  NAME`` lines)."""
    return {parts[1].lstrip("*"): parts[0].lower() for parts in map(str.split, text.splitlines())
            if len(parts) == 2}


def _fetch_sums(url: str, timeout: float) -> dict[str, str]:
    """The checksums a mirror publishes at ``url``; none when it publishes none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return _parse_sums(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return {}


def _valid_cache(stored: dict[str, Any], size: int) -> bool:
    images = stored.get("images")
    return (stored.get("format") == _CACHE_FORMAT and isinstance(images, Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape) == (NUM_CHARACTERS, DRAWINGS, size, size)
            and len(stored.get("alphabets", ())) == NUM_CHARACTERS)


def _decode(zips: list[Path], resample: Resample, size: int) -> OmniglotData:
    images = np.zeros((NUM_CHARACTERS, DRAWINGS, size, size), dtype=np.uint8)
    alphabets: list[str | None] = [None] * NUM_CHARACTERS
    seen = np.zeros((NUM_CHARACTERS, DRAWINGS), dtype=bool)
    first_ids = {"background": 1, "evaluation": NUM_BACKGROUND + 1}
    for path, part, count in zip(zips, first_ids, (NUM_BACKGROUND, NUM_EVALUATION), strict=True):
        lo, hi = first_ids[part] - 1, first_ids[part] - 1 + count
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if info.is_dir() or not info.filename.endswith(".png"):
                        continue
                    match = _PNG.fullmatch(info.filename)
                    if match is None or match[1] != part:
                        raise DataError(f"{path}: unexpected file {info.filename}; expected "
                                        f"images_{part}/Alphabet/characterNN/IIII_DD.png. "
                                        "Replace the zip with the official archive")
                    k, d = int(match[3]) - 1, int(match[4]) - 1
                    if not (lo <= k < hi and 0 <= d < DRAWINGS) or seen[k, d]:
                        raise DataError(f"{path}: {info.filename} is out of range or repeated "
                                        f"(character IDs {lo + 1}-{hi}, drawings 01-{DRAWINGS}). "
                                        "Replace the zip with the official archive")
                    if alphabets[k] not in (None, match[2]):
                        raise DataError(f"{path}: character {k + 1} appears under alphabets "
                                        f"{alphabets[k]} and {match[2]}. Replace the zip with "
                                        "the official archive")
                    with Image.open(io.BytesIO(archive.read(info))) as img:
                        if img.size != (SOURCE_SIZE, SOURCE_SIZE):
                            raise DataError(f"{path}: {info.filename} is {img.size[0]}x"
                                            f"{img.size[1]}, expected {SOURCE_SIZE}x"
                                            f"{SOURCE_SIZE}. Replace the zip with the official "
                                            "archive")
                        images[k, d] = _ink(img, resample, size)
                    alphabets[k] = match[2]
                    seen[k, d] = True
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DataError(f"{path} is corrupt or unreadable ({e}); delete it and put the "
                            "official archive there (`metagrad data omniglot --root DIR "
                            "--download URL` fetches and checks it)") from e
        missing = int((~seen[lo:hi]).sum())
        if missing:
            chars = int((~seen[lo:hi]).any(axis=1).sum())
            raise DataError(f"{path}: {missing} drawings of {chars} characters are missing; "
                            f"the {part} set has {count} characters x {DRAWINGS} drawings. "
                            "Replace the zip with the complete official archive")
    background = torch.arange(NUM_CHARACTERS) < NUM_BACKGROUND
    return OmniglotData(torch.from_numpy(images), tuple(str(a) for a in alphabets), background)


def _ink(img: Image.Image, resample: Resample, size: int) -> np.ndarray:
    """Resized drawing as uint8 with 255 = ink (the PNGs are white background, black ink)."""
    filt = Image.Resampling.LANCZOS if resample == "lanczos" else Image.Resampling.NEAREST
    grey = np.asarray(img.convert("L").resize((size, size), filt), dtype=np.uint8)
    return 255 - grey


@dataclass(frozen=True)
class OmniglotSplits:
    """Official character IDs (1..1623) of the meta-train, validation and test characters."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    protocol: str = "custom"
    seed: int | None = None

    def __post_init__(self) -> None:
        parts = {"train": self.train, "val": self.val, "test": self.test}
        for name, ids in parts.items():
            if any(not isinstance(i, int) or not 1 <= i <= NUM_CHARACTERS for i in ids):
                raise DataError(f"Omniglot split '{name}' holds IDs outside 1..{NUM_CHARACTERS}; "
                                "recreate the split with OmniglotSplits.create")
        overlap = (set(self.train) & set(self.val) | set(self.train) & set(self.test)
                   | set(self.val) & set(self.test))
        if overlap or any(len(set(ids)) != len(ids) for ids in parts.values()):
            raise DataError(f"Omniglot splits overlap or repeat characters (e.g. "
                            f"{sorted(overlap)[:5]}); recreate them with OmniglotSplits.create")

    @classmethod
    def create(cls, protocol: Literal["paper", "background"] = "paper", seed: int = 0,
               num_val: int = 100, num_train: int = 1200) -> OmniglotSplits:
        """``paper``: a seeded random ``num_train`` of all 1623 characters for meta-training
        (``num_val`` of them held out for validation), the other 1623 − ``num_train`` for test
        (MAML §5.2: 1200 / 423). ``background``: background alphabets for meta-training (minus a
        random ``num_val``), evaluation alphabets for test (``num_train`` is not used)."""
        if protocol == "paper":
            pool = NUM_CHARACTERS
            if not 1 <= num_train < NUM_CHARACTERS:
                raise ConfigError(f"num_train must be in 1..{NUM_CHARACTERS - 1}, got {num_train}")
        elif protocol == "background":
            pool, num_train = NUM_BACKGROUND, NUM_BACKGROUND
        else:
            raise ConfigError(f"unknown Omniglot split protocol {protocol!r}; use 'paper' or "
                              "'background'")
        if not 0 <= num_val < num_train:
            raise ConfigError(f"num_val must be in 0..{num_train - 1}, got {num_val}")
        perm = torch.randperm(pool, generator=torch.Generator().manual_seed(seed)) + 1
        if protocol == "paper":
            meta_train, test = perm[:num_train], perm[num_train:]
        else:
            meta_train, test = perm, torch.arange(NUM_BACKGROUND + 1, NUM_CHARACTERS + 1)
        return cls(_ids(meta_train[num_val:]), _ids(meta_train[:num_val]), _ids(test),
                   protocol, seed)

    def ids(self, split: SplitName) -> tuple[int, ...]:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
        return getattr(self, split)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready: protocol, seed and the sorted character IDs of each split."""
        return {"protocol": self.protocol, "seed": self.seed, "train": list(self.train),
                "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OmniglotSplits:
        try:
            return cls(*(tuple(int(i) for i in d[k]) for k in ("train", "val", "test")),
                       protocol=str(d.get("protocol", "custom")), seed=d.get("seed"))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not an Omniglot split ({e!r}); it needs lists 'train', 'val' and "
                            "'test' of character IDs as written by OmniglotSplits.to_dict") from e


def _ids(t: Tensor) -> tuple[int, ...]:
    return tuple(sorted(t.tolist()))


class OmniglotEpisodes(FewShotTasks):
    """N-way K-shot episodes from one Omniglot split: ``support_x`` float32
    ``[T, ways*shots, 1, S, S]`` in [0, 1] with ink = 1, labels int64 in ``0..ways-1``.

    ``splits`` defaults to ``OmniglotSplits.create()`` (paper protocol, seed 0). With
    ``rotations`` (all splits alike, as in the reference code), class ``c`` is character
    ``class_character_ids[c]`` rotated counter-clockwise by ``class_rotations[c]`` degrees; the
    rotated copies are precomputed (faster per batch than rotating gathered images).
    """

    def __init__(self, data: OmniglotData, split: SplitName = "train", ways: int = 5,
                 shots: int = 1, queries: int = 15, rotations: bool = True,
                 splits: OmniglotSplits | None = None, *,
                 device: torch.device | str | None = None) -> None:
        splits = splits if splits is not None else OmniglotSplits.create()
        ids = torch.tensor(splits.ids(split), dtype=torch.int64)
        images = data.images[ids - 1]  # [characters, 20, S, S]
        if rotations:
            images = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], dim=1)
            images = images.flatten(0, 1)  # class = character * 4 + rotation
            self.class_character_ids = ids.repeat_interleave(len(ROTATIONS))
            self.class_rotations = torch.tensor(ROTATIONS).repeat(len(ids))
        else:
            self.class_character_ids = ids
            self.class_rotations = torch.zeros_like(ids)
        self.split = split
        name = f"Omniglot {split} split ({len(ids)} characters{' x 4 rotations' * rotations})"
        super().__init__(ClassTensor(images.unsqueeze(2)), ways, shots, queries, device=device,
                         name=name)


# --- the ``omniglot`` task ----------------------------------------------------------------------

@dataclass
class OmniglotOptions:
    """Settings of the ``omniglot`` task (``config.task_options``)."""

    ways: int = field(default=5, metadata={"help": "classes per task (5 or 20 in the paper)"})
    data: str | None = field(default=None, metadata={
        "help": f"folder with the two Omniglot zips (default: ${DATA_ENV})"})
    split: str = field(default="paper", metadata={
        "help": "paper: 1200 random characters for training, 423 for test; background: "
                "background alphabets vs evaluation alphabets"})
    rotations: bool = field(default=True, metadata={
        "help": "each character at 0, 90, 180 and 270 degrees is its own class"})
    model: str = field(default="conv", metadata={
        "help": "conv: the paper's 4-layer convolutional net; mlp: its 256-128-64-64 MLP"})

    def __post_init__(self) -> None:
        require_int("ways", self.ways, 2)
        require_choice("split", self.split, ("paper", "background"))
        require_choice("rotations", self.rotations, (True, False))
        require_choice("model", self.model, ("conv", "mlp"))


# MAML §5.2 and appendix A.1. No ``queries``: they default to ``shots`` (see omniglot_task).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(CLASSIFICATION_RUN, ways=5, shots=1, inner_lr=0.4, inner_steps=1,
                  meta_batch=32, eval_steps=3),
    "paper-20way": dict(CLASSIFICATION_RUN, ways=20, shots=1, inner_lr=0.1, inner_steps=5,
                        meta_batch=16, eval_steps=5),
    # The most accurate 5-way 1-shot model in 20 minutes among the recipes measured with
    # benchmarks/time_to_accuracy.py (BENCHMARKS.md): the paper's settings with β annealed from
    # 1e-3 to 0 by a cosine over a 20-minute time limit, on any machine's speed. The test
    # protocol stays the paper's.
    "fast": dict(CLASSIFICATION_RUN, ways=5, shots=1, inner_lr=0.4, inner_steps=1,
                 meta_batch=32, eval_steps=3, meta_lr_schedule="cosine", min_meta_lr=0.0,
                 minutes=20.0, checkpoint_every=500),
}


def _default_preset(overrides: dict[str, Any]) -> str:
    """The paper's 20-way settings when ``ways >= 20`` is asked for, else its 5-way ones."""
    return "paper-20way" if int(overrides.get("ways", 5)) >= 20 else "paper"


@task(options=OmniglotOptions, presets=PRESETS, default_preset=_default_preset)
def omniglot_task(config: Any) -> TaskSetup:
    """Omniglot episodes (MAML §5.2) of the character split ``split`` seeded by
    ``config.seed``. Meta-training episodes have ``config.shots`` support and
    ``config.queries`` query drawings per class, ``shots`` when ``queries`` is ``None`` (the
    reference code's K query drawings); held-out ones ``config.eval_queries`` (else the same).
    All three splits are built here, so that settings the data cannot satisfy are refused
    before training. Artifact ``split.json``: the character IDs of each split."""
    opts: OmniglotOptions = config.task_options
    data = load_omniglot(opts.data)
    splits = OmniglotSplits.create(opts.split, seed=config.seed)  # type: ignore[arg-type]
    queries = config.shots if config.queries is None else config.queries
    eval_queries = config.eval_queries or queries
    episodes = {s: OmniglotEpisodes(data, s, opts.ways, config.shots,
                                    queries if s == "train" else eval_queries, opts.rotations,
                                    splits, device=config.device)
                for s in ("train", "val", "test")}
    size = data.images.shape[-1]

    def make_model() -> nn.Module:
        if opts.model == "mlp":
            return omniglot_mlp(opts.ways, size)
        return omniglot_conv(opts.ways, size)

    return classification_setup(episodes, make_model, {"split.json": splits.to_dict()})
