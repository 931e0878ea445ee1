"""Peak memory and time of one second-order MAML meta-iteration, with and without
``checkpoint_inner_steps`` (inner steps recomputed during the meta-backward instead of stored).

The workloads are bench_peers.py's W2 (Omniglot Conv4, 64 filters, BatchNorm with batch
statistics, 28x28x1, 1-shot, 15 queries per class, alpha 0.4, second order): ``w2-20way`` (16 tasks,
5 inner steps), ``w2-20way-10step`` (the same with 10 inner steps) and ``w2-5way`` (32 tasks,
1 step). A meta-iteration is ``MAML.meta_gradient`` (what the trainer calls: tasks looped, each
task's graph back-propagated before the next is built), no optimiser step.

Memory, in a fresh subprocess per configuration and repetition (configurations interleaved):
  * peak RSS growth over the first meta-iteration (the process's high-water mark VmHWM after -
    before; ``ru_maxrss`` would do on Linux only in a child of a small parent, since a process
    inherits its parent's ``ru_maxrss`` through fork + exec): what the operating system sees,
    allocator caching included;
  * peak live tensor bytes during a second meta-iteration, from the allocation events of
    ``torch.profiler(profile_memory=True)``: the part the option acts on, free of allocator noise.
Time: both configurations in one process, round-robin (benchmarks/timing.py); medians.
Exactness: the float32 meta-gradients of the two configurations are compared.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_memory.py \
        --workloads w2-20way,w2-20way-10step,w2-5way --repeats 3 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_peers import make_data, make_model
from timing import environment, interleaved

from metagrad import MAML
from metagrad.core.taskbatch import TaskBatch

# name: (ways, tasks, inner steps, alpha); all second order, bench_peers' stride-2 Conv4
WORKLOADS = {
    "w2-20way": (20, 16, 5, 0.4),
    "w2-20way-10step": (20, 16, 10, 0.4),
    "w2-5way": (5, 32, 1, 0.4),
}
MODES = {"stored": False, "checkpointed": True}


def build(workload: str, checkpoint: bool, arch: str) -> tuple[MAML, TaskBatch]:
    ways, tasks, steps, lr = WORKLOADS[workload]
    model = make_model("w2", ways, arch)
    maml = MAML(model, F.cross_entropy, inner_lr=lr, inner_steps=steps,
                checkpoint_inner_steps=checkpoint)
    return maml, TaskBatch(*make_data("w2", ways, tasks))


def meta_iteration(maml: MAML, batch: TaskBatch) -> None:
    for p in maml.parameters():
        p.grad = None
    maml.meta_gradient(batch)


def peak_tensor_bytes(fn) -> int:
    """Largest total of live tensor bytes allocated during ``fn()`` above those live before."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_rss_kib() -> int:
    """This process's peak resident set (Linux VmHWM; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(args) -> None:
    maml, batch = build(args.workloads, MODES[args.memory_child], args.arch)
    before = peak_rss_kib()
    meta_iteration(maml, batch)
    after = peak_rss_kib()
    for p in maml.parameters():
        p.grad = None  # freed before profiling: every allocation in the profile is the call's
    tensors = peak_tensor_bytes(lambda: maml.meta_gradient(batch))
    print(f"{(after - before) / 1024:.1f} {tensors / 2**20:.1f}")


def measure_memory(workload: str, args) -> dict[str, tuple[float, float]]:
    """{mode: (median RSS growth MB, median peak tensor MB)} over ``args.repeats`` subprocesses."""
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--workloads", workload,
                   "--arch", args.arch, "--threads", str(args.threads), "--memory-child", mode]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{workload} {mode} failed:\n{out.stderr[-2000:]}")
            rss, tensors = map(float, out.stdout.split()[-2:])
            samples[mode].append((rss, tensors))
            print(f"  {workload} {mode}: RSS growth {rss:.0f} MB, peak tensors {tensors:.1f} MB",
                  flush=True)
    return {m: (statistics.median(r for r, _ in s), statistics.median(t for _, t in s))
            for m, s in samples.items()}


def measure_time(workload: str, args) -> tuple[dict[str, tuple[float, float]], float]:
    runs, grads = {}, {}
    for mode, checkpoint in MODES.items():
        maml, batch = build(workload, checkpoint, args.arch)
        meta_iteration(maml, batch)
        grads[mode] = [p.grad.clone() for p in maml.parameters()]
        runs[mode] = (lambda m=maml, b=batch: meta_iteration(m, b))
    diff = max((a - b).abs().max().item()
               for a, b in zip(grads["stored"], grads["checkpointed"], strict=True))
    return interleaved(runs, rounds=args.rounds, warmup=args.warmup), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="w2-20way,w2-20way-10step,w2-5way")
    parser.add_argument("--arch", default="stride", help="W2 net: stride or max")
    parser.add_argument("--repeats", type=int, default=3, help="memory subprocesses per mode")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    print(environment())
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("command: " + " ".join(sys.argv))
    rows = []
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
        start = time.perf_counter()
        mem = measure_memory(workload, args)
        timed, diff = (None, None) if args.no_time else measure_time(workload, args)
        rows.append((workload, mem, timed, diff))
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n| workload ({args.arch}) | mode | peak RSS growth MB | peak live tensors MB "
          "| median ms / meta-iteration | max abs Δ meta-gradient |")
    print("|---|---|---|---|---|---|")
    for workload, mem, timed, diff in rows:
        for mode in MODES:
            ms = f"{timed[mode][0] * 1e3:.0f}" if timed else "-"
            delta = "-" if mode == "stored" or diff is None else f"{diff:.1e}"
            print(f"| {workload} | {mode} | {mem[mode][0]:.0f} | {mem[mode][1]:.1f} | {ms} "
                  f"| {delta} |")
        ratio_rss, ratio_tensors = (
            f"{mem['checkpointed'][i] / mem['stored'][i]:.2f}x" if mem["stored"][i] else "-"
            for i in (0, 1))
        ratio_time = f"{timed['checkpointed'][0] / timed['stored'][0]:.2f}x" if timed else "-"
        print(f"| {workload} | checkpointed / stored | {ratio_rss} | {ratio_tensors} | "
              f"{ratio_time} | |")
    print("\nload average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
