"""What one functional forward costs beyond the module's own forward: the Omniglot Conv4 on a
batch small enough (``--images``, default 1) that the parameter swap is a visible share.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_forward_overhead.py [--rounds 9]

Candidates, timed round-robin (each timed call is ``--calls`` forwards): the module called with its
own parameters; ``torch.func.functional_call`` with new parameter and buffer tensors; metagrad's
``FunctionalModel`` (the call every inner step and query pass makes) with the same tensors.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from timing import environment, interleaved, print_table
from torch.func import functional_call

from metagrad.core.functional import FunctionalModel
from metagrad.models.conv import omniglot_conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = omniglot_conv(5)
    x = torch.randn(args.images, 1, 28, 28)
    functional = FunctionalModel(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = functional.buffers()
    forwards = {
        "module(x), its own parameters": lambda: model(x),
        "torch.func.functional_call": lambda: functional_call(model, {**buffers, **params}, (x,)),
        "metagrad FunctionalModel": lambda: functional(params, buffers, x),
    }

    def repeated(forward):
        def run() -> None:
            with torch.no_grad():
                for _ in range(args.calls):
                    forward()
        return run

    results = interleaved({name: repeated(f) for name, f in forwards.items()},
                          rounds=args.rounds, warmup=1)
    print(environment())
    print_table(f"{args.calls} forwards of the Omniglot Conv4 on {args.images} image(s)", results)
    own = results["module(x), its own parameters"][0]
    for name, (median, _) in results.items():
        print(f"{name:<34} {(median - own) / args.calls * 1e6:+8.1f} µs per forward vs the module's own")


if __name__ == "__main__":
    main()
