"""MiniImageNet loaders (folder + CSV, pickle) on small synthetic data, and their episodes."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from metagrad.errors import ConfigError, DataError
from metagrad.tasks import miniimagenet
from metagrad.tasks.miniimagenet import MiniImageNetEpisodes, load_miniimagenet

torch.set_num_threads(1)

LABELS = ["n01", "n02", "n03", "n04", "n05", "n06"]
PER_CLASS = 6


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Both layouts of the same 'train' split; 'val' exists only as a folder."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    images = _images(len(LABELS) * PER_CLASS)
    rows, class_dict = [], {}
    # Interleave classes in the file so that grouping by label is exercised.
    for i in range(len(images)):
        label = LABELS[i % len(LABELS)]
        name = f"{label}{i:08d}.png"  # PNG: lossless, so both layouts decode identically
        Image.fromarray(images[i]).save(folder / "images" / name)
        rows.append(f"{name},{label}")
        class_dict.setdefault(label, []).append(i)
    for split in ("train", "val"):
        (folder / f"{split}.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return root


def test_both_layouts_give_the_same_tensor(root, tmp_path):
    a = load_miniimagenet("train", root, layout="pickle")
    b = load_miniimagenet("train", root / "miniimagenet", layout="folder", cache=tmp_path)
    assert a.images.shape == (len(LABELS), PER_CLASS, 3, 84, 84) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and a.labels == b.labels == tuple(LABELS)
    assert a.counts.tolist() == [PER_CLASS] * len(LABELS)
    # Class c holds the images listed for label c, channels first.
    raw = _images(len(LABELS) * PER_CLASS)
    assert torch.equal(a.images[1, 2], torch.from_numpy(raw[2 * len(LABELS) + 1]).permute(2, 0, 1))


def test_auto_layout_and_env(root, tmp_path, monkeypatch):
    monkeypatch.setenv("METAGRAD_DATA", str(root))
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path))
    assert len(load_miniimagenet("train")) == len(LABELS)  # pickle
    assert len(load_miniimagenet("val")) == len(LABELS)  # folder
    assert list(tmp_path.glob("miniimagenet-val-*.pt"))


def test_folder_cache_is_reused(root, tmp_path, monkeypatch):
    first = load_miniimagenet("val", root, cache=tmp_path)
    monkeypatch.setattr(miniimagenet, "_read_image", lambda *a: pytest.fail("decoded again"))
    assert torch.equal(load_miniimagenet("val", root, cache=tmp_path).images, first.images)


def test_episodes(root):
    data = load_miniimagenet("train", root)
    ep = MiniImageNetEpisodes(data, ways=5, shots=1, queries=3)
    g = torch.Generator().manual_seed(0)
    idx = ep.sample_indices(4, g)
    b = ep.batch(idx)
    assert b.support_x.shape == (4, 5, 3, 84, 84) and b.query_x.shape == (4, 15, 3, 84, 84)
    assert b.support_x.dtype == torch.float32 and 0 <= b.support_x.min() and b.support_x.max() <= 1
    assert torch.bincount(b.query_y[0], minlength=5).tolist() == [3] * 5
    assert not (idx.support[..., :, None] == idx.query[..., None, :]).any()
    c, i = int(idx.classes[2, 4]), int(idx.query[2, 4, 1])
    assert torch.equal(b.query_x[2, 4 * 3 + 1], data.images[c, i].float() / 255)
    again = ep.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(again.query_x, b.query_x)
    with pytest.raises(ConfigError, match="6 are available"):
        MiniImageNetEpisodes(data, ways=7)
    with pytest.raises(ConfigError, match="only 6"):
        MiniImageNetEpisodes(data, ways=5, shots=2, queries=5)


def test_unequal_class_sizes_never_sample_padding(tmp_path):
    counts = [4, 9, 6]
    images = _images(sum(counts), seed=1)
    starts = np.cumsum([0, *counts])
    class_dict = {f"n{c}": list(range(starts[c], starts[c + 1])) for c in range(3)}
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    data = load_miniimagenet("test", tmp_path)
    assert data.images.shape[:2] == (3, 9) and data.counts.tolist() == counts
    ep = MiniImageNetEpisodes(data, ways=3, shots=1, queries=3)
    idx = ep.sample_indices(200, torch.Generator().manual_seed(0))
    items = torch.cat([idx.support, idx.query], -1)
    assert bool((items < data.counts[idx.classes].unsqueeze(-1)).all())
    assert int(items[idx.classes == 1].max()) == 8  # the large class is sampled in full


def test_malicious_or_malformed_pickle(tmp_path):
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": os.system, "class_dict": {}}, f)
    with pytest.raises(DataError, match="refusing"):
        load_miniimagenet("train", tmp_path)
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {}}, f)
    with pytest.raises(DataError, match=r"uint8 \[N, H, W, 3\]"):
        load_miniimagenet("train", tmp_path)


def test_missing_and_malformed_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("METAGRAD_DATA", raising=False)
    with pytest.raises(DataError, match="METAGRAD_DATA"):
        load_miniimagenet("train")
    with pytest.raises(DataError, match=r"mini-imagenet-cache-test\.pkl or test\.csv"):
        load_miniimagenet("test", tmp_path)
    (tmp_path / "train.csv").write_text("file,class\n")
    with pytest.raises(DataError, match="images/"):
        load_miniimagenet("train", tmp_path, cache=tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="header 'filename,label'"):
        load_miniimagenet("train", tmp_path, cache=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        load_miniimagenet("training", tmp_path)
