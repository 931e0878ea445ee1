"""Task factories: each returns a working TaskSetup and refuses impossible settings up front."""

import dataclasses
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metagrad import MAML
from metagrad.config import resolve
from metagrad.errors import ConfigError
from metagrad.tasks import TASKS
from metagrad.tasks.fewshot import FolderOptions, folder_task
from metagrad.tasks.miniimagenet import MiniImageNetOptions, miniimagenet_task
from metagrad.tasks.omniglot import ZIPS, OmniglotOptions, omniglot_task
from metagrad.tasks.sinusoid import sinusoid_task

torch.set_num_threads(1)


def config(options=None, **shared):
    """The fields a factory reads: the shared settings and ``task_options``."""
    values = dict(shots=1, queries=2, eval_queries=None, seed=0, device=None, eval_shots=[1])
    return SimpleNamespace(**(values | shared), task_options=options)


def check_classification(setup, ways, shots, queries, eval_queries, x_shape):
    assert setup.metric == "accuracy" and setup.classes == ways
    b = setup.train.sample(3, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (3, ways * shots, *x_shape)
    assert b.query_x.shape == (3, ways * queries, *x_shape)
    val = setup.held_out("val", 2)
    assert setup.held_out("val", 2) is val  # built once
    t = setup.held_out("test", 2).sample(2, torch.Generator().manual_seed(0))
    assert t.support_x.shape == (2, ways * 2, *x_shape)
    assert t.query_x.shape == (2, ways * eval_queries, *x_shape)
    seen = setup.held_out("train", 2)  # the meta-training classes, held-out episode sizes
    assert seen.num_classes == setup.train.num_classes != setup.held_out("test", 2).num_classes
    assert seen.sample(1, torch.Generator()).query_x.shape == (1, ways * eval_queries, *x_shape)
    with pytest.raises(ConfigError, match="split"):
        setup.held_out("trian", 1)
    model = setup.make_model()
    assert model(b.query_x[0]).shape == (ways * queries, ways)
    assert setup.make_model() is not model


def test_registry_names_every_factory():
    assert TASKS.get("sinusoid") is sinusoid_task and TASKS.get("omniglot") is omniglot_task
    assert TASKS.get("miniimagenet") is miniimagenet_task and TASKS.get("folder") is folder_task
    for factory in (omniglot_task, miniimagenet_task, folder_task):
        for f in dataclasses.fields(factory.Options):
            assert f.metadata.get("help"), (factory.__name__, f.name)


# --- sinusoid ---------------------------------------------------------------------------------

def test_sinusoid_setup_and_prediction_figures(tmp_path):
    assert sinusoid_task.Options is None and set(sinusoid_task.presets) == {"paper", "quick"}
    assert sinusoid_task.default_preset({}) == "paper"
    assert sinusoid_task.presets["paper"]["iterations"] == 70000
    setup = sinusoid_task(config(shots=10, queries=10, eval_queries=100))
    assert setup.metric == "mse" and setup.classes is None
    b = setup.train.sample(4, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (4, 10, 1) and b.query_y.shape == (4, 10, 1)
    t = setup.held_out("test", 5).sample(2, torch.Generator().manual_seed(0))
    assert t.support_x.shape == (2, 5, 1) and t.query_x.shape == (2, 100, 1)
    model = setup.make_model()
    assert model(b.query_x[0]).shape == (10, 1)
    learners = {"maml": MAML(model, F.mse_loss), "pretrained": MAML(setup.make_model(),
                                                                  F.mse_loss)}
    paths = setup.plots(learners, tmp_path, [5], 1, torch.Generator().manual_seed(0))
    assert paths == [tmp_path / "sinusoid_predictions_K5.png"]
    assert paths[0].stat().st_size > 1000


# --- folder -----------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path, make_folder):
    for split, classes in (("train", 6), ("val", 3), ("test", 4)):
        make_folder(tmp_path / split, classes, items=5, size=12)
    return tmp_path


def test_folder_setup(folder):
    setup = folder_task(config(FolderOptions(str(folder), ways=3, image_size=16), eval_queries=3))
    check_classification(setup, 3, 1, 2, 3, (3, 16, 16))
    assert setup.artifacts["classes.json"]["val"] == ["class_0", "class_1", "class_2"]
    grey = folder_task(config(FolderOptions(str(folder), ways=2, image_size=20, channels=1)))
    check_classification(grey, 2, 1, 2, 2, (1, 20, 20))


def test_folder_refuses_impossible_settings_before_training(folder):
    with pytest.raises(ConfigError, match="val.*4-way episodes need 4 classes but only 3"):
        folder_task(config(FolderOptions(str(folder), ways=4)))
    with pytest.raises(ConfigError, match="shots \\+ queries = 3 \\+ 3 = 6.*only 5"):
        folder_task(config(FolderOptions(str(folder), ways=3), shots=3, queries=3))
    with pytest.raises(ConfigError, match="only 5"):  # held-out queries count too
        folder_task(config(FolderOptions(str(folder), ways=3), eval_queries=5))
    with pytest.raises(ConfigError, match="needs data=FOLDER"):
        folder_task(config(FolderOptions()))
    (folder / "test").rename(folder / "testing")
    with pytest.raises(ConfigError, match="lacks the sub-folders test/"):
        folder_task(config(FolderOptions(str(folder))))


@pytest.mark.parametrize("options, setting", [
    (FolderOptions, dict(ways=1)), (FolderOptions, dict(image_size=0)),
    (FolderOptions, dict(channels=2)), (FolderOptions, dict(model="resnet")),
    (OmniglotOptions, dict(ways=1)), (OmniglotOptions, dict(split="random")),
    (OmniglotOptions, dict(model="auto")), (OmniglotOptions, dict(rotations="yes")),
    (MiniImageNetOptions, dict(ways=0)),
])
def test_options_validate_their_range(options, setting):
    name = next(iter(setting))
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        options(**setting)


# --- miniimagenet -----------------------------------------------------------------------------

def test_miniimagenet_setup(tmp_path):
    rng = np.random.default_rng(0)
    for split, classes in (("train", 6), ("val", 5), ("test", 5)):
        images = rng.integers(0, 256, (classes * 4, 16, 16, 3), dtype=np.uint8)
        class_dict = {f"n{c:03d}": list(range(4 * c, 4 * c + 4)) for c in range(classes)}
        with open(tmp_path / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    assert miniimagenet_task.default_preset({"shots": 5}) == "paper-5shot"
    assert miniimagenet_task.default_preset({}) == "paper"
    setup = miniimagenet_task(config(MiniImageNetOptions(ways=5, data=str(tmp_path))))
    check_classification(setup, 5, 1, 2, 2, (3, 16, 16))
    with pytest.raises(ConfigError, match="val split.*6-way episodes need 6 classes but only 5"):
        miniimagenet_task(config(MiniImageNetOptions(ways=6, data=str(tmp_path))))


# --- omniglot ---------------------------------------------------------------------------------

def _omniglot_dir() -> Path | None:
    for base in (os.environ.get("METAGRAD_DATA"),
                 Path(__file__).resolve().parents[2].parent / "shared/data/omniglot"):
        if base:
            for folder in (Path(base), Path(base) / "omniglot"):
                if all((folder / z).is_file() for z in ZIPS):
                    return folder
    return None


OMNIGLOT = _omniglot_dir()


def test_omniglot_presets():
    assert omniglot_task.default_preset({"ways": 20}) == "paper-20way"
    assert omniglot_task.default_preset({}) == "paper"
    paper, twenty = omniglot_task.presets["paper"], omniglot_task.presets["paper-20way"]
    assert (paper["ways"], paper["inner_lr"], twenty["ways"], twenty["inner_steps"]) == (
        5, 0.4, 20, 5)
    assert "queries" not in paper and "queries" not in twenty  # queries follow shots
    fast = resolve("omniglot", "fast")
    assert (fast.ways, fast.first_order, fast.meta_lr_schedule, fast.minutes, fast.eval_queries,
            fast.eval_steps) == (5, False, "cosine", 20.0, 15, 3)  # the paper's test protocol


@pytest.mark.skipif(OMNIGLOT is None, reason="Omniglot zips not found: set METAGRAD_DATA or "
                    "provide ../shared/data/omniglot next to the repo")
def test_omniglot_setup():
    opts = OmniglotOptions(ways=5, data=str(OMNIGLOT))
    setup = omniglot_task(config(opts, shots=2, queries=None, eval_queries=4))
    check_classification(setup, 5, 2, 2, 4, (1, 28, 28))  # queries default to shots
    split = setup.artifacts["split.json"]
    assert (split["protocol"], len(split["train"]), len(split["test"])) == ("paper", 1100, 423)
    mlp = omniglot_task(config(dataclasses.replace(opts, model="mlp", rotations=False)))
    assert isinstance(mlp.make_model(), torch.nn.Sequential)
    with pytest.raises(ConfigError, match="val split.*only 400"):  # 100 characters x 4
        omniglot_task(config(dataclasses.replace(opts, ways=401)))
    with pytest.raises(ConfigError, match="= 21 items per class"):
        omniglot_task(config(opts, shots=5, queries=16))
