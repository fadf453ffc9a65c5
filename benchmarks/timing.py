"""Shared by the benchmarks: the machine's load, and interleaved timing of several functions in one run."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each call, round by round; each round runs every function once, starting one
    further along. CPU time (this process's, all its threads) is what a call costs whatever else the machine
    runs; wall time is what a user waits, and on shared cores it includes other jobs' time slices."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return wall, cpu


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3
