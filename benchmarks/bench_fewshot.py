"""Tasks per second of FewShotTasks on in-memory Omniglot-like data vs the former EpisodeSampler.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_fewshot.py [--baseline-rev REV]

The data are random uint8 images shaped like Omniglot's meta-training split with rotations
(4400 classes × 20 items × 1×28×28). Samplers timed, one batch each in turn (interleaved, so
that load from other processes hits all alike), median over repeats:

* ``EpisodeSampler@REV``: the class-indexed sampler as it was at git revision ``REV`` (read
  with ``git show``; skipped when git or the revision is not available);
* ``from_tensor``: :meth:`FewShotTasks.from_tensor` on the same tensor;
* ``Dataset``: :class:`FewShotTasks` over a map-style data set of ``(x, label)`` items, read
  once into its class tensor (construction time printed);
* ``Dataset+transform``: the same data set with an identity transform, so that every sampled
  item is read and transformed per episode (the path for augmentation and large data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # imported after OMP_WAIT_POLICY is set
from torch.utils.data import Dataset

from metagrad.core.taskbatch import TaskSampler
from metagrad.tasks.fewshot import FewShotTasks

SETTINGS = (  # (ways, shots, queries per class, tasks per batch): MAML §5.2
    (5, 1, 15, 32),
    (20, 1, 5, 16),
)
REPO = Path(__file__).resolve().parents[1]


class Items(Dataset):
    """Item ``k`` of a class-indexed tensor as ``(image, label)``, classes interleaved."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.classes = images.shape[0]

    def __len__(self) -> int:
        return self.images.shape[0] * self.images.shape[1]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self.images[k % self.classes, k // self.classes], k % self.classes


def former_sampler(rev: str) -> Callable[..., TaskSampler] | None:
    """``EpisodeSampler`` from ``metagrad/tasks/episodes.py`` at git revision ``rev``."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:metagrad/tasks/episodes.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"baseline skipped: cannot read episodes.py at {rev} ({e})")
        return None
    module = types.ModuleType(f"episodes_{rev}")
    exec(compile(source, f"episodes.py@{rev}", "exec"), module.__dict__)
    if not hasattr(module, "EpisodeIndices"):
        print(f"baseline skipped: episodes.py at {rev} is not the former EpisodeSampler")
        return None
    return module.EpisodeSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="47694e0",
                        help="git revision holding the former EpisodeSampler")
    parser.add_argument("--classes", type=int, default=4400)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--transform-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
          f"load average={os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.classes, 20, 1, 28, 28), dtype=torch.uint8, generator=g)
    former = former_sampler(args.baseline_rev)
    items = Items(images)
    for ways, shots, queries, tasks in SETTINGS:
        start = time.perf_counter()
        from_dataset = FewShotTasks(items, ways, shots, queries)
        built = time.perf_counter() - start
        samplers: dict[str, TaskSampler] = {
            "from_tensor": FewShotTasks.from_tensor(images, ways, shots, queries),
            "Dataset": from_dataset,
            "Dataset+transform": FewShotTasks(items, ways, shots, queries, lambda x: x),
        }
        if former is not None:
            samplers = {f"EpisodeSampler@{args.baseline_rev}": former(images, ways, shots,
                                                                      queries)} | samplers
        times: dict[str, list[float]] = {name: [] for name in samplers}
        for r in range(args.repeats):
            for name, sampler in samplers.items():
                if name == "Dataset+transform" and r >= args.transform_repeats:
                    continue
                t = time.perf_counter()
                sampler.sample(tasks, g)
                times[name].append(time.perf_counter() - t)
        print(f"\n{ways}-way {shots}-shot, {queries} queries/class, {tasks} tasks per batch "
              f"(Dataset read into memory in {built:.1f} s):")
        for name, ts in times.items():
            median = statistics.median(ts[1:])  # the first batch warms up
            print(f"  {name:<26} {tasks / median:>9.0f} tasks/s  ({median * 1e3:.2f} ms per "
                  f"batch, median of {len(ts) - 1})")


if __name__ == "__main__":
    main()
