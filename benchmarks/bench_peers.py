"""metagrad vs other MAML implementations on the same hardware, in one process: the same model,
the same initial weights, the same batch and the same loss for every implementation. Each one's
meta-gradient is first compared with a plain ``torch.autograd.grad(create_graph=True)`` per-task
loop (float32), then all are timed round-robin (benchmarks/timing.py). A timed call computes the
meta-gradient into ``.grad`` (forward, inner steps, backward); no optimiser step.

Workloads:
  w1          sinusoid MLP 1-40-40-1, 25 tasks x (10 support + 10 query), alpha 0.01,
              1 and 5 inner steps, second order
  w2-5way     Omniglot Conv4 (64 filters, BatchNorm with batch statistics), 28x28x1, 5-way 1-shot,
              15 queries per class (`--queries`), 32 tasks, alpha 0.4, 1 inner step, second order
  w2-5way-fo  the same, first order
  w2-20way    20-way 1-shot, 15 queries per class, 16 tasks, 5 inner steps, second order
``--arch stride`` is the paper's Omniglot net (stride-2 convolutions, no pooling), ``--arch max``
the 2x2 max-pooling variant (stride-1 convolutions); both take ``--arch stride,max``.

Peers (optional; run in the separate benchmark venv, see benchmarks/README):
    OMP_WAIT_POLICY=PASSIVE .venv-bench/bin/python benchmarks/bench_peers.py --workloads w1
    OMP_WAIT_POLICY=PASSIVE .venv-bench/bin/python benchmarks/bench_peers.py \
        --workloads w2-5way,w2-5way-fo --arch stride --rounds 5 --variants
Other modes: ``--profile`` (torch.profiler of metagrad on W2), ``--memory`` (peak RSS of each
implementation on W2 20-way, one subprocess each), ``--compile`` (adds torch.compile variants),
``--bf16`` (adds metagrad's ``precision="bf16"`` on W2, its meta-gradient checked within 10% of
the largest component with cosine >= 0.99), ``--ceiling`` (the fastest any implementation of the
same maths could be on this CPU: the meta-iteration's floating-point operations, counted by
``torch.utils.flop_counter``, at this machine's measured single-precision matmul rate, against
the plain loop's time).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
from timing import environment, interleaved

from metagrad import MAML
from metagrad.core.fast_norm import batch_norm_as_tensor_ops
from metagrad.core.functional import double_backward_kernels
from metagrad.core.inner_loop import gradient_step
from metagrad.models.conv import Conv4
from metagrad.models.mlp import sinusoid_mlp
from metagrad.tasks.sinusoid import SinusoidTasks

TOLERANCE = {"w1": 1e-5, "w1bn": 1e-5, "w2": 1e-4}  # max |meta-gradient - plain loop's|, float32
# A result is also accepted when its error against a float64 plain loop is at most F64_FACTOR times
# the float32 plain loop's own error (W2 with alpha 0.4 amplifies float32 rounding).
F64_FACTOR = 3.0
# Rows that show where a difference comes from, not a peer's documented idiom: not counted as
# the fastest peer.
REFERENCE = "reference: "
# ``--bf16``: metagrad's bfloat16 policy is checked as the mixed-precision tests check it (max
# |difference| to the float32 loop within BF16_RELATIVE of the largest component, cosine at least
# BF16_COSINE), not at float32's tolerance.
BF16_LABEL, BF16_RELATIVE, BF16_COSINE = "metagrad (auto), bf16", 1e-1, 0.99


# -- workloads --------------------------------------------------------------------------------
WORKLOADS = {
    # name: (kind, ways, tasks, inner steps, first order, alpha)
    "w1-1step": ("w1", None, 25, 1, False, 0.01),
    "w1-5step": ("w1", None, 25, 5, False, 0.01),
    "w2-5way": ("w2", 5, 32, 1, False, 0.4),
    "w2-5way-fo": ("w2", 5, 32, 1, True, 0.4),
    "w2-20way": ("w2", 20, 16, 5, False, 0.4),
    # the sinusoid MLP with BatchNorm1d after each hidden layer: where the auto rule matters
    "w1-bn": ("w1bn", None, 25, 1, False, 0.01),
}


def expand_workloads(spec: str) -> list[str]:
    out = []
    for name in spec.split(","):
        out += ["w1-1step", "w1-5step"] if name == "w1" else [name]
    for name in out:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from w1, {', '.join(WORKLOADS)}")
    return out


def make_model(kind: str, ways: int | None, arch: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "w1":
        return sinusoid_mlp()
    if kind == "w1bn":
        return nn.Sequential(nn.Linear(1, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 40),
                             nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 1))
    return Conv4(1, ways, hidden=64, pooling=arch, input_size=28)


def make_data(kind: str, ways: int | None, tasks: int, queries: int = 15
              ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    if kind in ("w1", "w1bn"):
        return SinusoidTasks(10, 10).sample(tasks, g).tensors()
    sx = torch.randn(tasks, ways, 1, 28, 28, generator=g)
    qx = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return sx, sy, qx, qy


# -- metagrad variants ----------------------------------------------------------------------
def with_plain_bn(model: nn.Module, step):
    def run(data):
        with batch_norm_as_tensor_ops(model):
            step(data)
    return run


def without_mkldnn(step):
    """The same maths with oneDNN convolutions switched off (ATen's own conv kernels)."""
    def run(data):
        with torch.backends.mkldnn.flags(enabled=False):
            step(data)
    return run


def hybrid_first_step(model, loss_fn, lr, steps, first_order):
    """All tasks start from θ: the first inner step is vmapped over tasks (θ unbatched, so its
    forward is one convolution over all support sets, with per-task BatchNorm statistics); the
    remaining steps and the query loss run per task. Plain-ops BatchNorm throughout."""
    maml = MAML(model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order)

    def step(data):
        for p in maml.parameters():
            p.grad = None
        sx, sy, qx, qy = data
        buffers = maml.functional.buffers()
        theta = maml.params()
        with batch_norm_as_tensor_ops(model), double_backward_kernels(not first_order):
            def first(x, y):
                return gradient_step(
                    lambda p: maml.loss(p, x, y, buffers, batch_statistics=True), theta,
                    maml.adapted_names, lr, 0, first_order)
            theta1 = vmap(first)(sx, sy)
            losses = []
            for i in range(sx.shape[0]):
                p = {n: t[i] for n, t in theta1.items()}
                if steps > 1:
                    p = maml.adapt(sx[i], sy[i], steps - 1, params=p, buffers=buffers)
                losses.append(maml.loss(p, qx[i], qy[i], buffers))
            torch.stack(losses).mean().backward()
    return step


def channels_last(data):
    """The images of ``data`` with exact NHWC strides per image (also with one channel, where
    ``contiguous(memory_format=torch.channels_last)`` keeps NCHW strides and the network stays
    NCHW)."""

    def nhwc(x):
        _, n, c, h, w = x.shape
        out = torch.empty_strided(x.shape, (n * h * w * c, h * w * c, 1, w * c, c),
                                  dtype=x.dtype)
        return out.copy_(x)

    sx, sy, qx, qy = data
    return nhwc(sx), sy, nhwc(qx), qy


def compiled_meta_loss(model, loss_fn, lr, steps, first_order, batching="auto"):
    """``torch.compile`` of metagrad's meta-loss (forward incl. the inner gradient steps); the outer
    backward runs through the compiled graph's backward."""
    maml = MAML(model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order,
                batching=batching)
    fn = torch.compile(maml.meta_loss, fullgraph=False, dynamic=False)

    def step(data):
        for p in maml.parameters():
            p.grad = None
        fn(*data).backward()
    return step


class _MetaLoss(nn.Module):
    """``forward(*data) = maml.meta_loss(*data)``, so that ``functional_call`` can feed it θ."""

    def __init__(self, maml: MAML) -> None:
        super().__init__()
        self.maml = maml

    def forward(self, *data):
        return self.maml.meta_loss(*data)


def compiled_functional_grad(model, loss_fn, lr, steps, first_order, batching="auto"):
    """``torch.compile(torch.func.grad_and_value(θ -> meta_loss))``: forward, inner steps and the
    outer backward in one compiled graph; the meta-gradient is returned and written to ``.grad``."""
    maml = MAML(model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order,
                batching=batching)
    wrapper = _MetaLoss(maml)
    live = dict(wrapper.named_parameters())
    fn = torch.compile(torch.func.grad_and_value(
        lambda p, *data: torch.func.functional_call(wrapper, p, data)), dynamic=False)

    def step(data):
        grads, _ = fn({n: p.detach() for n, p in live.items()}, *data)
        for n, p in live.items():
            p.grad = grads[n]
    return step


def compiled_task_loop(model, loss_fn, lr, steps, first_order):
    """metagrad's per-task loop with ``torch.compile`` of one task's query loss (inner steps
    included); the outer backward runs through the compiled graphs' backward."""
    maml = MAML(model, loss_fn, inner_lr=lr, inner_steps=steps, first_order=first_order,
                batching="loop")
    task = torch.compile(maml.task_query_loss, dynamic=False)

    def step(data):
        for p in maml.parameters():
            p.grad = None
        torch.stack([task(*t) for t in zip(*data, strict=True)]).mean().backward()
    return step


def candidates_for(name: str, arch: str, args, available_peers) -> dict[str, tuple]:
    """{label: (builder(model, loss, lr, steps, first_order) -> step, needs channels_last)}"""
    kind, _, _, _, first_order, _ = WORKLOADS[name]
    c: dict[str, tuple] = {"plain autograd loop": (peers.plain_loop, False)}
    if not args.no_peers:
        c.update({k: (v, False) for k, v in available_peers.items()})
    c["metagrad (auto)"] = (peers.metagrad_maml, False)
    if kind == "w2":
        c["metagrad (auto), contiguous layout"] = (
            lambda m, *a: peers.metagrad_maml(m, *a, memory_format="contiguous"), False)
        c[REFERENCE + "plain loop, channels-last inputs"] = (peers.plain_loop, True)
    if kind == "w2" and args.bf16:
        c[BF16_LABEL] = (lambda m, *a: peers.metagrad_maml(m, *a, precision="bf16"), False)
    if kind == "w2" and args.variants:
        c["metagrad loop + plain-ops BN"] = (
            lambda m, *a: with_plain_bn(m, peers.metagrad_maml(m, *a, batching="loop")), False)
        c["metagrad vmap + plain-ops BN"] = (
            lambda m, *a: with_plain_bn(m, peers.metagrad_maml(m, *a, batching="vmap")), False)
        c["metagrad hybrid (step 1 vmapped)"] = (hybrid_first_step, False)
        if first_order:
            c["metagrad vmap, native BN"] = (
                lambda m, *a: peers.metagrad_maml(m, *a, batching="vmap"), False)
    if kind == "w1bn":
        c["metagrad vmap + plain-ops BN"] = (
            lambda m, *a: with_plain_bn(m, peers.metagrad_maml(m, *a, batching="vmap")), False)
    if kind == "w2" and args.mkldnn_off:
        c["metagrad (auto), mkldnn off"] = (
            lambda m, *a: without_mkldnn(peers.metagrad_maml(m, *a)), False)
        c["metagrad vmap + plain-ops BN, mkldnn off"] = (
            lambda m, *a: without_mkldnn(with_plain_bn(m, peers.metagrad_maml(
                m, *a, batching="vmap"))), False)
    if args.compile:
        if kind == "w1":
            c["metagrad compiled meta_loss (vmap)"] = (compiled_meta_loss, False)
            c["metagrad compiled grad_and_value (vmap)"] = (compiled_functional_grad, False)
        else:
            c["metagrad compiled task loss (loop)"] = (compiled_task_loop, False)
            c["metagrad compiled task loss (loop) + plain-ops BN"] = (
                lambda m, *a: with_plain_bn(m, compiled_task_loop(m, *a)), False)
            c["metagrad compiled meta_loss (vmap) + plain-ops BN"] = (
                lambda m, *a: with_plain_bn(m, compiled_meta_loss(m, *a, batching="vmap")),
                False)
            c["metagrad compiled grad_and_value (vmap) + plain-ops BN"] = (
                lambda m, *a: with_plain_bn(m, compiled_functional_grad(
                    m, *a, batching="vmap")), False)
    return c


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def run_workload(name: str, arch: str, args, available_peers) -> None:
    kind, ways, tasks, steps, first_order, lr = WORKLOADS[name]
    base = make_model(kind, ways, arch)
    data = make_data(kind, ways, tasks, args.queries)
    loss_fn = F.cross_entropy if kind == "w2" else F.mse_loss
    title = (f"{name}" + (f" ({arch}, {args.queries} queries/class)" if kind == "w2" else "")
             + f": {tasks} tasks, {steps} inner step(s), {'first' if first_order else 'second'}"
             " order")
    print(f"\n## {title}", flush=True)
    steps_fns, results = {}, {}
    reference = None
    tol = TOLERANCE[kind]
    model64 = copy.deepcopy(base).double()
    data64 = tuple(t.double() if t.is_floating_point() else t for t in data)
    peers.plain_loop(model64, loss_fn, lr, steps, first_order)(data64)
    ref64 = [p.grad for p in model64.parameters()]
    loop_error64 = None
    for label, (builder, nhwc) in candidates_for(name, arch, args, available_peers).items():
        model = copy.deepcopy(base)
        d = data
        if nhwc:
            d = channels_last(data)
        try:
            fn = builder(model, loss_fn, lr, steps, first_order)
        except Exception as exc:
            print(f"  {label}: could not be built ({type(exc).__name__}: {exc})")
            continue
        if fn is None:
            print(f"  {label}: n/a for this setting")
            continue
        start = time.perf_counter()
        try:
            fn(d)
        except Exception as exc:
            print(f"  {label}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        first_call = time.perf_counter() - start
        g = grads_of(model)
        if reference is None:
            reference = g
            diff = 0.0
        else:
            diff = max((a - b).abs().max().item() for a, b in zip(g, reference, strict=True))
        scale = max(t.abs().max().item() for t in reference)
        error64 = max((a.double() - b).abs().max().item() for a, b in zip(g, ref64, strict=True))
        if loop_error64 is None:
            loop_error64 = error64
        if label == BF16_LABEL:
            cosine = torch.nn.functional.cosine_similarity(
                torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in reference]),
                dim=0).item()
            ok = diff <= BF16_RELATIVE * scale and cosine >= BF16_COSINE
            flag = ("ok" if ok else "MISMATCH") + f", relative {diff / scale:.3f}, cosine {cosine:.4f}"
        else:
            ok = diff <= tol or error64 <= F64_FACTOR * loop_error64
            flag = "ok" if ok else "MISMATCH"
        print(f"  parity {label:<38} max|Δ| vs f32 loop = {diff:.2e}, vs f64 loop = "
              f"{error64:.2e}  ({flag}; max|g| {scale:.2e}; first call {first_call * 1e3:.0f} ms)",
              flush=True)
        steps_fns[label] = (lambda f=fn, x=d: f(x))
        results[label] = (diff, first_call, error64)
    timed = interleaved(steps_fns, rounds=args.rounds, warmup=args.warmup)
    fastest_peer = min((m for k, (m, _) in timed.items()
                        if not k.startswith(("metagrad", REFERENCE))), default=None)
    print(f"\n| {title} | median ms | min ms | fastest peer / this (median) | max abs Δ vs f32 loop "
          "| max abs Δ vs f64 loop | first call ms (incl. compile) |")
    print("|---|---|---|---|---|---|---|")
    for label, (median, low) in timed.items():
        ratio = f"{fastest_peer / median:.2f}x" if fastest_peer else "-"
        print(f"| {label} | {median * 1e3:.1f} | {low * 1e3:.1f} | {ratio} | "
              f"{results[label][0]:.1e} | {results[label][2]:.1e} | {results[label][1] * 1e3:.0f} |")
    sys.stdout.flush()


# -- profile ----------------------------------------------------------------------------------
def w2_workloads(args):
    """``(workload, arch, (kind, ways, tasks, steps, first_order, lr), data)`` of each chosen
    W2 workload and architecture."""
    for arch in args.arch.split(","):
        for wl in expand_workloads(args.workloads):
            kind, ways, tasks, *_ = WORKLOADS[wl]
            if kind == "w2":
                yield wl, arch, WORKLOADS[wl], make_data(kind, ways, tasks, args.queries)


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    for wl, arch, (kind, ways, _, steps, fo, lr), data in w2_workloads(args):
        for label, batching in (("metagrad (auto = loop)", "auto"),
                                ("metagrad vmap + plain-ops BN", "vmap")):
            model = make_model(kind, ways, arch)
            fn = peers.metagrad_maml(model, F.cross_entropy, lr, steps, fo, batching=batching)
            if batching == "vmap":
                fn = with_plain_bn(model, fn)
            fn(data)
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                fn(data)
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            print(f"\n### profile {wl} ({arch}), {label}: total self CPU {total / 1e3:.0f} ms")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=48))


def matmul_gflops(size: int = 1024, repeats: int = 15) -> float:
    """The best single-precision rate of a ``size``³ matrix product here (a proxy of peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def ceiling(args) -> None:
    """Lower bound on any implementation's time: every counted FLOP at the matmul peak, all
    else (BatchNorm, ReLU, copies, Python) free; against the plain loop's measured time."""
    from torch.utils.flop_counter import FlopCounterMode
    peak = matmul_gflops()
    print(f"\nsingle-precision matmul peak here: {peak:.1f} GFLOP/s ({args.threads} thread(s))")
    for wl, arch, (kind, ways, _, steps, fo, lr), data in w2_workloads(args):
        model = make_model(kind, ways, arch)
        loop = peers.plain_loop(model, F.cross_entropy, lr, steps, fo)
        counter = FlopCounterMode(display=False)
        with counter:
            loop(data)
        gflop = counter.get_total_flops() / 1e9
        (median, low), = interleaved({"loop": functools.partial(loop, data)}, args.rounds,
                                     args.warmup).values()
        bound = gflop / peak
        print(f"{wl} ({arch}): {gflop:.1f} GFLOP per meta-iteration; plain loop "
              f"{median * 1e3:.0f} ms median ({gflop / median:.1f} GFLOP/s), "
              f"{low * 1e3:.0f} ms min; at peak {bound * 1e3:.0f} ms: no implementation "
              f"of these FLOPs can be more than {median / bound:.2f}x faster "
              f"({low / bound:.2f}x against the min)")


# -- memory -----------------------------------------------------------------------------------
def memory_child(args) -> None:
    label = args.memory_child
    kind, ways, tasks, steps, fo, lr = WORKLOADS[args.workloads]
    arch = args.arch
    model = make_model(kind, ways, arch)
    data = make_data(kind, ways, tasks, args.queries)
    available_peers, _ = peers.available()
    args.variants, args.no_peers = True, False
    builder, nhwc = candidates_for(args.workloads, arch, args, available_peers)[label]
    if nhwc:
        data = channels_last(data)
    fn = builder(model, F.cross_entropy, lr, steps, fo)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(data)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{before / 1024:.0f} {after / 1024:.0f}")


def memory(args) -> None:
    available_peers, _ = peers.available()
    for arch in args.arch.split(","):
        wl = "w2-20way"
        args.variants = True
        labels = list(candidates_for(wl, arch, args, available_peers))
        print(f"\n| peak RSS, {wl} ({arch}), one meta-gradient | RSS before MB | peak MB | "
              "peak - before MB |")
        print("|---|---|---|---|")
        for label in labels:
            cmd = [sys.executable, os.path.abspath(__file__), "--workloads", wl, "--arch", arch,
                   "--threads", str(args.threads), "--memory-child", label]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {label} | failed: {out.stderr.strip().splitlines()[-1][:100]} | | |")
                continue
            before, after = map(float, out.stdout.split()[-2:])
            print(f"| {label} | {before:.0f} | {after:.0f} | {after - before:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="w1,w2-5way,w2-5way-fo,w2-20way")
    parser.add_argument("--arch", default="stride", help="W2 net: stride, max or stride,max")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15,
                        help="W2 query images per class (the paper's training presets: 1)")
    parser.add_argument("--variants", action="store_true",
                        help="also time metagrad speed-up candidates on W2")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--bf16", action="store_true",
                        help="also time metagrad's precision='bf16' on W2 (bfloat16 query passes)")
    parser.add_argument("--mkldnn-off", action="store_true",
                        help="also time metagrad on W2 with oneDNN convolutions disabled")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--ceiling", action="store_true",
                        help="W2: the speed-up no implementation of the same FLOPs can exceed")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    available_peers, versions = peers.available()
    print(environment())
    print("peers: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("command: " + " ".join(sys.argv))
    if args.profile:
        profile(args)
        return
    if args.memory:
        memory(args)
        return
    if args.ceiling:
        ceiling(args)
        return
    for wl in expand_workloads(args.workloads):
        for arch in (args.arch.split(",") if WORKLOADS[wl][0] == "w2" else ["-"]):
            run_workload(wl, arch, args, available_peers)
    print("\nload average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
