"""Mixed precision on W2: per-op profile and step time of the second-order meta-gradient in
float32 and under the bfloat16 policies, plus metagrad's float32 overhead against a plain loop.

W2: the paper's Omniglot net (``--arch stride``: stride-2 convolutions; ``max``: max-pooling),
5-way 1-shot (5 support images), 15 queries per class (75 query images), 32 tasks, α 0.4,
``--steps`` inner steps (default 1), second order (``--first-order`` for FOMAML).

Variants (each one :meth:`MAML.meta_gradient` into ``.grad``, no optimizer step):
  fp32          precision="fp32"
  bf16          precision="bf16" (its policy: query forwards in bfloat16, inner loop float32)
  bf16-all      every forward in bfloat16, the inner loop (and its double backward) included
  plain-loop    ``torch.autograd.grad(create_graph=True)`` per task, float32 (``--overhead``)

Prints the share of the FLOPs in query passes, then, for each variant, the meta-gradient's error against float32 (max |difference| relative
to the largest component, and cosine), a torch.profiler table of one step (``--top`` ops by self
CPU time), then the interleaved step times (median, min, ratio to fp32; benchmarks/timing.py).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_precision.py \
        --rounds 10 [--overhead] [--steps 5] [--arch max] [--memory-format contiguous]

metagrad's variants lay out query inputs by ``--memory-format`` (default ``auto``: channels-last
on CPU for this net, as the library does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
from timing import environment, interleaved, print_table

from metagrad import MAML
from metagrad.core.layout import MEMORY_FORMATS
from metagrad.core.taskbatch import TaskBatch
from metagrad.models.conv import Conv4

WAYS, QUERIES, TASKS, LR = 5, 15, 32, 0.4


def make_data(tasks: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.randn(tasks, WAYS, 1, 28, 28, generator=g),
                     torch.arange(WAYS).repeat(tasks, 1),
                     torch.randn(tasks, WAYS * QUERIES, 1, 28, 28, generator=g),
                     torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1))


def make_learner(variant: str, args: argparse.Namespace) -> MAML:
    torch.manual_seed(0)
    model = Conv4(1, WAYS, hidden=64, pooling=args.arch, input_size=28)
    learner = MAML(model, F.cross_entropy, inner_lr=LR, inner_steps=args.steps,
                   first_order=args.first_order, memory_format=args.memory_format,
                   precision="fp32" if variant == "fp32" else "bf16")
    if variant == "bf16-all":
        learner.policy = dataclasses.replace(learner.policy, support=True)
    return learner


def step_of(variant: str, args: argparse.Namespace, data: TaskBatch
            ) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """A call computing the variant's meta-gradient, and its parameters (holding ``.grad``)."""
    if variant == "plain-loop":
        torch.manual_seed(0)
        model = Conv4(1, WAYS, hidden=64, pooling=args.arch, input_size=28)
        plain = peers.plain_loop(model, F.cross_entropy, LR, args.steps, args.first_order)
        return (lambda: plain(data.tensors())), list(model.parameters())
    learner = make_learner(variant, args)

    def run() -> None:
        learner.zero_grad(set_to_none=True)
        learner.meta_gradient(data)
    return run, list(learner.model.parameters())


def query_flop_share(args: argparse.Namespace) -> float:
    """The share of one task's meta-gradient FLOPs spent in query passes (forward and
    backward): FLOPs are affine in the number of queries, so two counts give the slope."""
    def count(queries: int) -> int:
        learner = make_learner("fp32", args)
        batch = TaskBatch(torch.randn(1, WAYS, 1, 28, 28), torch.arange(WAYS)[None],
                          torch.randn(1, queries, 1, 28, 28),
                          torch.arange(WAYS).repeat_interleave(queries // WAYS)[None])
        with FlopCounterMode(display=False) as counter:
            learner.meta_gradient(batch)
        return counter.get_total_flops()

    full, small = count(WAYS * QUERIES), count(WAYS)
    return (full - small) / (WAYS * QUERIES - WAYS) * WAYS * QUERIES / full


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="stride", choices=("stride", "max"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=TASKS)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="ops shown per profile")
    parser.add_argument("--variants", default="fp32,bf16,bf16-all")
    parser.add_argument("--overhead", action="store_true",
                        help="also time the plain float32 loop (metagrad's overhead)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--memory-format", default="auto",
                        choices=MEMORY_FORMATS,
                        help="metagrad's layout of query inputs (default: the library's)")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["plain-loop"] if args.overhead else [])
    data = make_data(args.tasks)
    print(environment(), "| load", os.getloadavg())
    print(f"W2 {args.arch}: {args.tasks} tasks, {WAYS} support + {WAYS * QUERIES} query images, "
          f"{args.steps} step(s), {'first' if args.first_order else 'second'} order, "
          f"memory_format={args.memory_format}")
    print(f"query passes: {query_flop_share(args):.1%} of the meta-gradient's FLOPs")
    steps = {v: step_of(v, args, data) for v in variants}
    reference = None
    for name, (run, params) in steps.items():
        run()
        g = flat_grad(params)
        if reference is None:
            reference = g
        error = ((g - reference).abs().max() / reference.abs().max()).item()
        cosine = F.cosine_similarity(g, reference, dim=0).item()
        print(f"{name:<12} meta-gradient vs {variants[0]}: max error / max |g| {error:.4f}, "
              f"cosine {cosine:.5f}")
    if not args.no_profile:
        for name, (run, _) in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\n### profile {name}: total self CPU {total / 1e3:.0f} ms")
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top,
                               max_name_column_width=44))
    results = interleaved({name: run for name, (run, _) in steps.items()},
                          rounds=args.rounds, warmup=1)
    print_table(f"W2 meta-gradient step, {args.rounds} interleaved rounds "
                f"(load after: {os.getloadavg()})", results)
    base = results[variants[0]][0]
    for name, (median, _) in results.items():
        print(f"{name:<12} median / {variants[0]}: {median / base:.3f}")


if __name__ == "__main__":
    main()
