"""Channels-last (NHWC) against contiguous (NCHW) activations on the Omniglot conv nets, by batch
size: the measurements behind metagrad's ``memory_format`` policy (metagrad.core.layout).

For each net (``--arch stride,max``) and number of images, two computations are timed
round-robin in both layouts (the input converted to exact NHWC strides, the weights as given):

* ``first order``: a forward and the gradient of its loss (a query pass of the meta-gradient);
* ``second order``: a forward, its gradient with ``create_graph=True``, and the gradient of
  that gradient's squared norm (the work of a second-order inner step's support pass).

Prints NCHW time / NHWC time (> 1: channels-last is faster) and each median.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_layout.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import environment, interleaved

from metagrad.core.layout import exactly_channels_last
from metagrad.models.conv import Conv4


def gradient_work(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, second_order: bool):
    params = list(model.parameters())

    def run() -> None:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=second_order)
        if second_order:
            torch.autograd.grad(sum((g * g).sum() for g in grads), params)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="stride,max")
    parser.add_argument("--images", default="5,10,20,40,80,160,300")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment())
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("\n| net | images | first order: NCHW / NHWC ms | ratio | second order: NCHW / NHWC ms "
          "| ratio |")
    print("|---|---|---|---|---|---|")
    for arch in args.arch.split(","):
        torch.manual_seed(0)
        model = Conv4(1, 5, hidden=64, pooling=arch, input_size=28)
        for n in map(int, args.images.split(",")):
            x = torch.randn(n, 1, 28, 28)
            y = torch.randint(0, 5, (n,))
            cells = []
            for second_order in (False, True):
                timed = interleaved({
                    layout: gradient_work(model, inputs, y, second_order)
                    for layout, inputs in (("nchw", x), ("nhwc", exactly_channels_last(x)))},
                    rounds=args.rounds, warmup=2)
                nchw, nhwc = timed["nchw"][0], timed["nhwc"][0]
                cells.append(f"{nchw * 1e3:.1f} / {nhwc * 1e3:.1f} | {nchw / nhwc:.2f}×")
            print(f"| {arch} | {n} | " + " | ".join(cells) + " |", flush=True)
    print("\nload average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
