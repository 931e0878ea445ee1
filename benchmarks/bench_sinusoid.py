"""ms per meta-iteration on the sinusoid workload of MAML §5.1 (meta-batch 25, K = 10 support and
10 query points, MLP 1-40-40-1): forward, backward to the meta-gradient, Adam step.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_sinusoid.py [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import environment, interleaved, print_table

from metagrad import MAML
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks


def meta_iteration(maml: MAML, opt: torch.optim.Optimizer, batch) -> None:
    opt.zero_grad(set_to_none=True)
    maml.meta_gradient(batch)
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = SinusoidTasks(10, 10).sample(25, torch.Generator().manual_seed(0))
    print(environment())
    for steps in (1, 5):
        candidates = {}
        for order in ("second", "first"):
            for batching in ("vmap", "loop"):
                maml = MAML(sinusoid_mlp(), F.mse_loss, inner_lr=0.01, inner_steps=steps,
                            first_order=order == "first", batching=batching)
                opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
                candidates[f"{order} order, {batching}"] = (
                    lambda m=maml, o=opt: meta_iteration(m, o, batch))
        print_table(f"sinusoid, 25 tasks, K=10, {steps} inner step(s)",
                    interleaved(candidates, rounds=args.rounds))


if __name__ == "__main__":
    main()
