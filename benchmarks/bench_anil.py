"""ANIL against MAML per meta-iteration on the Omniglot conv net (W2 of BENCHMARKS.md: 5-way
1-shot, 15 queries per class, 32 tasks, α = 0.4, 1 inner step, second order).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_anil.py [--rounds 7]

ANIL adapts only the head, so its inner step never back-propagates into the body; the outer step
still does (the body is meta-learned), which bounds the saving.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from timing import environment, interleaved, print_table

from metagrad import MAML
from metagrad.algorithms.anil import ANIL
from metagrad.core.taskbatch import TaskBatch
from metagrad.models.conv import omniglot_conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks, ways, queries = 32, 5, 15
    batch = TaskBatch(torch.randn(tasks, ways, 1, 28, 28), torch.arange(ways).repeat(tasks, 1),
                      torch.randn(tasks, ways * queries, 1, 28, 28),
                      torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1))
    learners = {"MAML": MAML(omniglot_conv(ways), F.cross_entropy, inner_lr=0.4),
                "ANIL": ANIL(omniglot_conv(ways), F.cross_entropy, inner_lr=0.4)}

    def step(learner: MAML) -> None:
        learner.zero_grad()
        learner.meta_gradient(batch)

    print(environment())
    print_table("meta-iteration, W2 5-way 1-shot, second order",
                interleaved({name: (lambda lr=lr: step(lr)) for name, lr in learners.items()},
                            rounds=args.rounds, warmup=1))


if __name__ == "__main__":
    main()
