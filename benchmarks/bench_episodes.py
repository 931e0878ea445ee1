"""Milliseconds per sampled batch of Omniglot episodes (MAML §5.2 settings), median of repeats.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_episodes.py [--data DIR]

Data: ``--data``, else ``$METAGRAD_DATA``, else ``../shared/data/omniglot`` next to the repo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # imported after OMP_WAIT_POLICY is set

from metagrad.tasks.omniglot import OmniglotEpisodes, load_omniglot

SETTINGS = (  # (ways, shots, queries per class, tasks per batch)
    (5, 1, 15, 32),
    (20, 1, 5, 16),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--cache", default=None, help="cache folder (default: METAGRAD_CACHE)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.data or os.environ.get("METAGRAD_DATA") or (
        Path(__file__).resolve().parents[1].parent / "shared/data/omniglot")

    start = time.perf_counter()
    data = load_omniglot(data_dir, cache=args.cache)
    print(f"load_omniglot: {time.perf_counter() - start:.2f} s (decodes on the first run only)")
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    for ways, shots, queries, tasks in SETTINGS:
        episodes = OmniglotEpisodes(data, "train", ways=ways, shots=shots, queries=queries)
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):  # warm-up
            episodes.sample(tasks, generator)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            episodes.sample(tasks, generator)
            times.append(time.perf_counter() - t)
        print(f"{ways:>2}-way {shots}-shot, {queries:>2} queries/class, {tasks} tasks: "
              f"{statistics.median(times) * 1e3:.2f} ms per batch (median of {args.repeats})")


if __name__ == "__main__":
    main()
