"""Interleaved timing: every candidate runs once per round, round-robin, so that load from other
processes hits all of them alike; report the median and minimum per candidate."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def environment() -> str:
    return (f"torch {torch.__version__}, python {platform.python_version()}, "
            f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
            f"cpu {platform.processor() or platform.machine()}")


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 30, warmup: int = 3
                ) -> dict[str, tuple[float, float]]:
    """``{name: (median seconds, min seconds)}`` over ``rounds`` round-robin repetitions."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def print_table(title: str, results: dict[str, tuple[float, float]]) -> None:
    fastest = min(median for median, _ in results.values())
    print(f"\n{title}")
    print(f"{'implementation':<34}{'median ms':>11}{'min ms':>9}{'x fastest':>11}")
    for name, (median, low) in results.items():
        print(f"{name:<34}{median * 1e3:>11.2f}{low * 1e3:>9.2f}{median / fastest:>11.2f}")
