"""FewShotTasks: episodes over a generated Dataset, a class-indexed tensor and an image folder."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from metagrad.errors import ConfigError, DataError
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.fewshot import ClassTensor, FewShotTasks, ImageFolder

torch.set_num_threads(1)

CLASSES, ITEMS = 7, 6
LABELS = [10 * c + 3 for c in range(CLASSES)]  # integers, not 0..C-1


class Items(Dataset):
    """Item ``k`` is ``(x, label)`` with ``x`` a float tensor ``[2, 3]`` filled with ``k``:
    every input names its item. Items of a class are interleaved with the other classes'."""

    def __init__(self, labels=None, x_shape=(2, 3)):
        self.labels = labels if labels is not None else [
            LABELS[k % CLASSES] for k in range(CLASSES * ITEMS)]
        self.x_shape = x_shape

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        return torch.full(self.x_shape, float(k)), self.labels[k]


def _ids(x):
    """The dataset index each input encodes: ``[tasks, n]``."""
    return x.flatten(2)[..., 0].long()


def _check_episodes(b, dataset, ways, shots, queries, tasks):
    assert b.support_x.shape == (tasks, ways * shots, 2, 3)
    assert b.query_x.shape == (tasks, ways * queries, 2, 3)
    assert b.support_y.dtype == b.query_y.dtype == torch.int64
    expected_s = torch.arange(ways).repeat_interleave(shots)
    expected_q = torch.arange(ways).repeat_interleave(queries)
    for t in range(tasks):
        assert torch.equal(b.support_y[t], expected_s) and torch.equal(b.query_y[t], expected_q)
        s, q = _ids(b.support_x)[t].tolist(), _ids(b.query_x)[t].tolist()
        assert len(set(s)) == len(s) and len(set(q)) == len(q) and not set(s) & set(q)
        # Label j names one original class, the same in support and query; distinct per label.
        classes = []
        for j in range(ways):
            names = {dataset.labels[k] for k in s[j * shots:(j + 1) * shots]}
            names |= {dataset.labels[k] for k in q[j * queries:(j + 1) * queries]}
            assert len(names) == 1
            classes.append(names.pop())
        assert len(set(classes)) == ways


def test_dataset_shapes_relabelling_and_disjoint_sets():
    data = Items()
    tasks = FewShotTasks(data, ways=4, shots=2, queries=3)
    assert tasks.num_classes == CLASSES and tasks.class_labels == tuple(LABELS)
    b = tasks.sample(20, torch.Generator().manual_seed(0))
    _check_episodes(b, data, 4, 2, 3, 20)
    # Label 0 goes to different classes across episodes (fresh random order per episode).
    first = {data.labels[int(k)] for k in _ids(b.support_x)[:, 0]}
    assert len(first) > 3
    # ... and labels are not given in class order.
    order = torch.tensor([[data.labels[int(k)] for k in ids] for ids in _ids(b.support_x)])
    assert not torch.equal(order.sort(dim=1).values, order)


def test_transform_path_samples_the_same_episodes_and_applies_the_transform():
    data = Items()
    fast = FewShotTasks(data, 3, 1, 2)
    seen = []

    def plus(x):
        seen.append(x)
        return x + 1000

    slow = FewShotTasks(data, 3, 1, 2, transform=plus)
    a = fast.sample(5, torch.Generator().manual_seed(4))
    b = slow.sample(5, torch.Generator().manual_seed(4))
    assert torch.equal(a.support_x + 1000, b.support_x) and torch.equal(a.query_x + 1000, b.query_x)
    assert torch.equal(a.query_y, b.query_y)
    assert len(seen) == 5 * 3 * 3  # each sampled item read and transformed once


def test_labels_from_targets_are_read_without_items():
    class WithTargets(Items):
        @property
        def targets(self):
            return torch.tensor(self.labels)

        def __getitem__(self, k):
            if reading_labels:
                pytest.fail("read an item to find its label")
            return super().__getitem__(k)

    reading_labels = True
    tasks = FewShotTasks(WithTargets(), 3, 1, 1, transform=lambda x: x)
    reading_labels = False
    assert tasks.num_classes == CLASSES
    tasks.sample(2, torch.Generator().manual_seed(0))


def test_determinism_from_the_generator():
    tasks = FewShotTasks(Items(), 5, 1, 4)

    def draw(seed):
        return tasks.sample(6, torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
    assert not torch.equal(a.support_x, c.support_x)


def test_old_episode_sampler_seeds_reproduce():
    """Indices drawn by the former EpisodeSampler (before FewShotTasks) for seed 0, padded
    classes included: the same generator gives the same episodes."""
    images = torch.zeros(7, 5, 1, dtype=torch.uint8)
    tasks = EpisodeSampler(images, 3, 2, 1, counts=torch.tensor([5, 3, 5, 4, 5, 5, 3]))
    idx = tasks.sample_indices(2, torch.Generator().manual_seed(0))
    assert idx.classes.tolist() == [[2, 3, 4], [5, 6, 3]]
    assert idx.support.tolist() == [[[4, 0], [0, 3], [3, 4]], [[3, 4], [1, 0], [2, 1]]]
    assert idx.query.tolist() == [[[1], [1], [0]], [[1], [2], [3]]]


def test_class_tensor_uint8_scaling_padding_and_device():
    counts = [4, 2, 3]
    images = torch.zeros(3, 4, 1, dtype=torch.uint8)  # padding is 0
    for c, n in enumerate(counts):
        images[c, :n, 0] = 1 + c + 50 * torch.arange(n)  # class c + 1, item i: never 0
    tasks = FewShotTasks.from_tensor(images, 3, 1, 1, counts=counts)
    b = tasks.sample(200, torch.Generator().manual_seed(0))
    assert b.query_x.dtype == torch.float32 and float(b.query_x.max()) <= 1.0
    values = torch.cat([b.support_x, b.query_x], 1)[..., 0].mul(255).round().long()
    assert bool((values > 0).all())  # padding is never sampled
    assert int(values[values % 50 == 1].max()) == 151  # all four items of class 0 are
    labels = torch.cat([b.support_y, b.query_y], 1)
    for j in range(3):
        assert bool(((values[labels == j] - 1) % 50).view(200, 2).diff(dim=1).eq(0).all())
    assert tasks.replace().sample(1, torch.Generator()).query_x.device.type == "cpu"
    on_meta = FewShotTasks.from_tensor(images, 3, 1, 1, counts=counts, device="meta")
    batch = on_meta.sample(2, torch.Generator().manual_seed(0))
    assert {t.device.type for t in batch.tensors()} == {"meta"}
    # As a Dataset (read with a transform): the valid items only, the same episodes.
    ct = ClassTensor(images, counts)
    assert len(ct) == 9 and ct.targets == [0] * 4 + [1] * 2 + [2] * 3
    assert ct[4][1] == 1 and int(ct[5][0]) == 52
    lazy = FewShotTasks(ct, 3, 1, 1, transform=lambda x: x)
    again = lazy.sample(200, torch.Generator().manual_seed(0))
    assert torch.equal(again.query_x, b.query_x) and torch.equal(again.support_x, b.support_x)


def test_replace_shares_items_and_checks_again():
    tasks = FewShotTasks(Items(), 5, 1, 1)
    five = tasks.replace(shots=5)
    assert five.images is tasks.images and (five.shots, tasks.shots) == (5, 1)
    assert five.sample(1, torch.Generator()).support_x.shape[1] == 25
    with pytest.raises(ConfigError, match="shots \\+ queries = 6 \\+ 1 = 7"):
        tasks.replace(shots=6)


# --- errors -----------------------------------------------------------------------------------

def test_sizes_the_data_cannot_satisfy():
    with pytest.raises(ConfigError, match="8-way episodes need 8 classes but only 7"):
        FewShotTasks(Items(), 8, 1, 1)
    labels = [LABELS[k % CLASSES] for k in range(CLASSES * ITEMS)]
    labels[0] = 99  # class 99 has one item, class 3 one fewer
    with pytest.raises(ConfigError, match="only 1 \\(e.g. class 99\\).*<= 1"):
        FewShotTasks(Items(labels), 2, 1, 1)
    with pytest.raises(ConfigError, match="shots must be a positive integer"):
        FewShotTasks(Items(), 2, 0, 1)
    with pytest.raises(ConfigError, match="num_tasks"):
        FewShotTasks(Items(), 2, 1, 1).sample(0, torch.Generator())


@pytest.mark.parametrize("label", ["cat", 1.0, True, torch.tensor(2.0), torch.tensor([1, 2])])
def test_labels_that_are_not_integers(label):
    labels = [LABELS[k % CLASSES] for k in range(CLASSES * ITEMS)]
    labels[5] = label
    with pytest.raises(DataError, match="item 5 has label .* labels must be integers"):
        FewShotTasks(Items(labels), 2, 1, 1)


def test_integer_labels_of_any_kind():
    labels = [np.int64(k % 3) if k % 2 else torch.tensor(k % 3) for k in range(12)]
    assert FewShotTasks(Items(labels), 3, 2, 2).class_labels == (0, 1, 2)


def test_items_the_sampler_cannot_stack():
    class Mixed(Items):
        def __getitem__(self, k):
            x, y = super().__getitem__(k)
            return (x[:1] if k == 3 else x), y

    with pytest.raises(DataError, match="item 3 has shape \\(1, 3\\).*item 0 \\(2, 3\\)"):
        FewShotTasks(Mixed(), 2, 1, 1)
    lazy = FewShotTasks(Mixed(), CLASSES, ITEMS - 1, 1, transform=lambda x: x)
    with pytest.raises(DataError, match="one size"):
        lazy.sample(1, torch.Generator())

    class Lists(Items):
        def __getitem__(self, k):
            return [0.0, 1.0], self.labels[k]

    with pytest.raises(DataError, match="item 0 is a list; items must be tensors or PIL"):
        FewShotTasks(Lists(), 2, 1, 1)
    with pytest.raises(DataError, match="the data set is empty"):
        FewShotTasks(Items([]), 2, 1, 1)


# --- image folders ----------------------------------------------------------------------------

def test_folder_episodes(tmp_path, make_folder):
    root = make_folder(tmp_path / "data", classes=5, items=4)
    (root / "class_0" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    tasks = FewShotTasks.from_folder(root, ways=3, shots=1, queries=2)
    assert tasks.num_classes == 5 and tasks.dataset.classes == [f"class_{c}" for c in range(5)]
    b = tasks.sample(10, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (10, 3, 3, 8, 8) and b.query_x.shape == (10, 6, 3, 8, 8)
    red = torch.cat([b.support_x, b.query_x], 1)[:, :, 0, 0, 0].mul(255).round().long()
    assert float(b.support_x[0, 0, 1, 0, 0]) == pytest.approx(100 / 255)
    for t in range(10):
        labels = torch.cat([b.support_y[t], b.query_y[t]])
        for j in range(3):
            r = red[t][labels == j]
            assert len(set((r // 20).tolist())) == 1 and len(set(r.tolist())) == 3  # disjoint


def test_folder_grey_resize_and_transform(tmp_path, make_folder):
    root = make_folder(tmp_path / "data", classes=3, items=3, size=10)
    grey = FewShotTasks.from_folder(root, 3, 1, 1, image_size=6, channels=1)
    assert grey.sample(2, torch.Generator()).query_x.shape == (2, 3, 1, 6, 6)
    sizes = []

    def to_tensor(img):
        sizes.append(img.size)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)[None, :2, :2])

    shrunk = FewShotTasks.from_folder(root, 3, 1, 1, to_tensor, image_size=4, channels=1)
    b = shrunk.sample(2, torch.Generator())
    assert b.support_x.shape == (2, 3, 1, 2, 2) and b.support_x.dtype == torch.float32
    assert set(sizes) == {(4, 4)} and float(b.support_x.max()) > 1  # no /255 for float output


def test_folder_errors(tmp_path, make_folder):
    with pytest.raises(DataError, match="is not a folder"):
        FewShotTasks.from_folder(tmp_path / "nope", 2, 1, 1)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images: expected one sub-folder per class"):
        FewShotTasks.from_folder(tmp_path / "empty", 2, 1, 1)
    root = make_folder(tmp_path / "mixed", classes=2, items=3, mode="mixed")
    with pytest.raises(DataError, match="set image_size|image_size="):
        FewShotTasks.from_folder(root, 2, 1, 1)
    assert FewShotTasks.from_folder(root, 2, 1, 1, image_size=8).num_classes == 2
    (root / "class_1" / "item_9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read image .*item_9.png"):
        FewShotTasks.from_folder(root, 2, 1, 1, image_size=8)
    with pytest.raises(ConfigError, match="channels"):
        ImageFolder(root, channels=2)
    with pytest.raises(ConfigError, match="3-way episodes need 3 classes but only 2"):
        FewShotTasks.from_folder(make_folder(tmp_path / "two", 2, 3), 3, 1, 1)
