"""MAML meta-trained briefly on episodes from an image folder adapts on held-out classes."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metagrad import MAML
from metagrad.models.conv import Conv4
from metagrad.tasks.fewshot import FewShotTasks

torch.set_num_threads(1)


def write_classes(root: Path, generator: torch.Generator, classes: int = 50,
                  held_out: int = 10, items: int = 6) -> None:
    """Grey 16×16 PNGs: each class a random blocky binary prototype, its items copies with 10%
    of the pixels flipped; the last ``held_out`` classes go to ``root/test``."""
    protos = (torch.rand(classes, 4, 4, generator=generator) > 0.5)
    protos = protos.repeat_interleave(4, -1).repeat_interleave(4, -2)
    for c in range(classes):
        folder = root / ("train" if c < classes - held_out else "test") / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(items):
            flips = torch.rand(16, 16, generator=generator) < 0.1
            pixels = (protos[c] ^ flips).numpy().astype(np.uint8) * 255
            Image.fromarray(pixels, "L").save(folder / f"{i}.png")


def accuracy(learner: MAML, tasks: FewShotTasks, steps: int, num_tasks: int = 25) -> float:
    """Mean query accuracy after ``steps`` inner steps on ``num_tasks`` fixed test tasks."""
    b = tasks.sample(num_tasks, torch.Generator().manual_seed(1))
    correct = 0.0
    for t in range(num_tasks):
        params = learner.adapt(b.support_x[t], b.support_y[t], steps, first_order=True)
        with torch.no_grad():
            pred = learner.functional_forward(params, b.query_x[t]).argmax(1)
        correct += (pred == b.query_y[t]).float().mean().item()
    return correct / num_tasks


def test_maml_on_a_folder_adapts_to_held_out_classes(tmp_path):
    """5-way 1-shot, labels permuted per episode: without steps the held-out accuracy is chance
    (20%); one step after 30 first-order meta-iterations is far above it, and far above one
    step from the untrained network."""
    g = torch.Generator().manual_seed(0)
    write_classes(tmp_path, g)
    train = FewShotTasks.from_folder(tmp_path / "train", 5, 1, 2, channels=1)
    test = FewShotTasks.from_folder(tmp_path / "test", 5, 1, 5, channels=1)
    assert (train.num_classes, test.num_classes) == (40, 10)
    torch.manual_seed(0)
    learner = MAML(Conv4(1, 5, hidden=16, input_size=16), F.cross_entropy, inner_lr=0.1,
                   first_order=True)
    untrained = accuracy(learner, test, 1)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        learner.meta_gradient(train.sample(4, g))
        opt.step()
    before, after = accuracy(learner, test, 0), accuracy(learner, test, 1)
    assert before < 0.35 and after > 0.6 and after > untrained + 0.2, (before, after, untrained)
