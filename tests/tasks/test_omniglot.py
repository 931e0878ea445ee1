"""Omniglot: validation of the zips, the decoded cache, splits, rotation classes and episodes."""

import io
import json
import os
import time
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metagrad.errors import ConfigError, DataError
from metagrad.tasks import omniglot
from metagrad.tasks.episodes import source_key
from metagrad.tasks.omniglot import (
    NUM_BACKGROUND,
    NUM_CHARACTERS,
    OmniglotEpisodes,
    OmniglotSplits,
    load_omniglot,
)

torch.set_num_threads(1)


def _data_dir() -> Path | None:
    for base in (os.environ.get("METAGRAD_DATA"),
                 Path(__file__).resolve().parents[2].parent / "shared/data/omniglot"):
        if base:
            for folder in (Path(base), Path(base) / "omniglot"):
                if all((folder / z).is_file() for z in omniglot.ZIPS):
                    return folder
    return None


DATA = _data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="Omniglot zips not found: set METAGRAD_DATA "
                                "or provide ../shared/data/omniglot next to the repo")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def data(cache):
    start = time.perf_counter()
    loaded = load_omniglot(DATA, cache=cache)
    print(f"Omniglot decode: {time.perf_counter() - start:.1f} s")
    return loaded


@pytest.fixture(scope="session")
def train(data):
    return OmniglotEpisodes(data, "train", ways=5, shots=1, queries=15)


# --- loading ----------------------------------------------------------------------------------

@needs_data
def test_counts_ids_and_pixels(data):
    assert data.images.shape == (NUM_CHARACTERS, 20, 28, 28) and data.images.dtype == torch.uint8
    assert int(data.background.sum()) == NUM_BACKGROUND == 964
    assert NUM_CHARACTERS - NUM_BACKGROUND == 659
    assert data.alphabets[0] == "Arcadian" and data.alphabets[-1] == "ULOG"
    assert len(set(data.alphabets[:964])) == 30 and len(set(data.alphabets[964:])) == 20
    # Ink is 255: every drawing has strokes, and they cover a minority of its pixels.
    assert bool((data.images.flatten(2).amax(-1) >= 128).all())
    assert bool((data.images.float().mean(dim=(2, 3)) < 0.3 * 255).all())
    # Distinct drawings per character (nothing duplicated by an indexing bug).
    flat = data.images[:50].flatten(2)
    assert all(len(torch.unique(f, dim=0)) == 20 for f in flat)


@needs_data
def test_second_load_uses_cache(data, cache, monkeypatch):
    monkeypatch.setattr(omniglot, "_decode", lambda *a: pytest.fail("decoded again"))
    start = time.perf_counter()
    again = load_omniglot(DATA, cache=cache)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(again.images, data.images) and again.alphabets == data.alphabets
    assert not list(Path(cache).glob("*.tmp"))


@needs_data
def test_env_var_accepts_parent_folder(data, cache, monkeypatch):
    monkeypatch.setenv("METAGRAD_DATA", str(DATA.parent))
    if DATA.name == "omniglot":
        assert omniglot.find_omniglot() == DATA
    monkeypatch.setenv("METAGRAD_DATA", str(DATA))
    assert omniglot.find_omniglot() == DATA


def test_cache_key_follows_size_and_mtime(tmp_path):
    f = tmp_path / "images_background.zip"
    f.write_bytes(b"abc")
    key = source_key([f], 1)
    os.utime(f, ns=(0, 10**18))
    assert source_key([f], 1) != key
    key = source_key([f], 1)
    f.write_bytes(b"abcd")
    os.utime(f, ns=(0, 10**18))
    assert source_key([f], 1) != key
    assert source_key([f], 2) != source_key([f], 1)


def test_missing_folder_says_what_to_put_where(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"images_background\.zip.*images_evaluation\.zip"):
        load_omniglot(tmp_path / "nope", cache=tmp_path)
    monkeypatch.delenv("METAGRAD_DATA", raising=False)
    with pytest.raises(DataError, match="METAGRAD_DATA"):
        load_omniglot(cache=tmp_path)


def test_no_network_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"could not download https://github\.com/brendenlake"):
        load_omniglot(tmp_path / "data", cache=tmp_path, download=True)
    assert not list((tmp_path / "data").iterdir())  # no partial file left behind


def _png(color: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (105, 105), color).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_zip(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    (tmp_path / "images_evaluation.zip").write_bytes(b"")
    with pytest.raises(DataError, match="corrupt"):
        load_omniglot(tmp_path, cache=tmp_path / "cache")


def test_wrong_counts(tmp_path):
    for part in ("background", "evaluation"):
        first = 1 if part == "background" else 965
        with zipfile.ZipFile(tmp_path / f"images_{part}.zip", "w") as z:
            for d in range(1, 21):
                z.writestr(f"images_{part}/Latin/character01/{first:04d}_{d:02d}.png", _png())
    with pytest.raises(DataError, match=r"missing.*964 characters x 20 drawings"):
        load_omniglot(tmp_path, cache=tmp_path / "cache")


def test_misplaced_file(tmp_path):
    for part in ("background", "evaluation"):
        with zipfile.ZipFile(tmp_path / f"images_{part}.zip", "w") as z:
            z.writestr(f"images_{part}/Latin/character01/0001_21.png", _png())
    with pytest.raises(DataError, match="out of range"):
        load_omniglot(tmp_path, cache=tmp_path / "cache")


# --- splits -----------------------------------------------------------------------------------

def test_paper_split_sizes_determinism_and_disjointness():
    a, b = OmniglotSplits.create(seed=0), OmniglotSplits.create(seed=0)
    assert a == b and OmniglotSplits.create(seed=1).train != a.train
    assert (len(a.train), len(a.val), len(a.test)) == (1100, 100, 423)
    assert sorted(a.train + a.val + a.test) == list(range(1, NUM_CHARACTERS + 1))
    c = OmniglotSplits.create(num_val=200)
    assert (len(c.train), len(c.val), len(c.test)) == (1000, 200, 423)


def test_background_split():
    s = OmniglotSplits.create("background", seed=3, num_val=50)
    assert sorted(s.train + s.val) == list(range(1, 965)) and len(s.val) == 50
    assert s.test == tuple(range(965, 1624))


def test_split_round_trip_and_validation():
    s = OmniglotSplits.create(seed=5)
    assert OmniglotSplits.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    bad = s.to_dict() | {"val": [s.train[0]]}
    with pytest.raises(DataError, match="overlap"):
        OmniglotSplits.from_dict(bad)
    with pytest.raises(DataError, match="train"):
        OmniglotSplits.from_dict({"val": [], "test": []})
    with pytest.raises(ConfigError, match="protocol"):
        OmniglotSplits.create("random")
    with pytest.raises(ConfigError, match="num_val"):
        OmniglotSplits.create(num_val=1200)


# --- episodes ---------------------------------------------------------------------------------

@needs_data
def test_rotation_classes_never_cross_splits(data):
    splits = OmniglotSplits.create(seed=0)
    eps = {p: OmniglotEpisodes(data, p, splits=splits) for p in ("train", "val", "test")}
    for part, ep in eps.items():
        n = len(splits.ids(part))
        assert ep.num_classes == 4 * n
        assert sorted(torch.bincount(ep.class_rotations // 90).tolist()) == [n] * 4
    chars = {p: set(ep.class_character_ids.tolist()) for p, ep in eps.items()}
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"]
                or chars["val"] & chars["test"])
    plain = OmniglotEpisodes(data, "test", rotations=False, splits=splits)
    assert plain.num_classes == 423


@needs_data
def test_episode_shapes_labels_and_counts(train):
    b = train.sample(8, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (8, 5, 1, 28, 28) and b.query_x.shape == (8, 75, 1, 28, 28)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.int64
    assert 0.0 <= float(b.support_x.min()) and float(b.query_x.max()) <= 1.0
    assert float((b.query_x == 0).float().mean()) > 0.5  # background 0, ink 1
    for t in range(8):
        assert torch.bincount(b.support_y[t], minlength=5).tolist() == [1] * 5
        assert torch.bincount(b.query_y[t], minlength=5).tolist() == [15] * 5


@needs_data
def test_episode_determinism(train):
    def draw(seed):
        return train.sample(4, torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)


@needs_data
def test_support_query_disjoint_and_pixels_match(train, data):
    ep = OmniglotEpisodes(data, "train", ways=20, shots=5, queries=15)
    idx = ep.sample_indices(16, torch.Generator().manual_seed(3))
    for t in range(16):
        assert len(set(idx.classes[t].tolist())) == 20
        for j in range(20):
            s, q = set(idx.support[t, j].tolist()), set(idx.query[t, j].tolist())
            assert len(s) == 5 and len(q) == 15 and not s & q and max(s | q) < 20
    b = ep.batch(idx)
    # Class j of task 0 is character class_character_ids[c] rotated by class_rotations[c].
    for j in range(20):
        c = int(idx.classes[0, j])
        char, rot = int(ep.class_character_ids[c]), int(ep.class_rotations[c])
        d = int(idx.support[0, j, 0])
        expected = torch.rot90(data.images[char - 1, d], rot // 90).float() / 255
        assert torch.equal(b.support_x[0, j * 5, 0], expected)
        assert int(b.support_y[0, j * 5]) == j
        # No query image of this class equals any of its support images.
        sx = b.support_x[0, j * 5:(j + 1) * 5].flatten(1)
        qx = b.query_x[0, j * 15:(j + 1) * 15].flatten(1)
        assert not (sx[:, None] == qx[None]).all(-1).any()


@needs_data
def test_labels_are_permuted_between_episodes(train):
    idx = train.sample_indices(64, torch.Generator().manual_seed(0))
    # Label j goes to a fresh random class each episode, in a fresh order.
    assert len(set(idx.classes[:, 0].tolist())) > 32
    assert not torch.equal(idx.classes.sort(dim=1).values, idx.classes)


@needs_data
def test_too_many_ways_or_items(data):
    with pytest.raises(ConfigError, match=r"423 are available"):
        OmniglotEpisodes(data, "test", ways=500, rotations=False)
    with pytest.raises(ConfigError, match=r"shots \+ queries = 5 \+ 16 = 21"):
        OmniglotEpisodes(data, "train", ways=5, shots=5, queries=16)
    with pytest.raises(ConfigError, match="split"):
        OmniglotEpisodes(data, "validation")
    with pytest.raises(ConfigError, match="shots"):
        OmniglotEpisodes(data, "train", shots=0)
