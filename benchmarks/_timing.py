"""Timing helpers shared by the benchmarks: wall seconds, and CPU seconds that include workers.

On a shared VM the wall clock moves with the neighbours; the CPU seconds of a process and of its
finished children (shard writers, DataLoader workers, `tar`) move far less, so benchmarks print
both. Imported by the scripts in this folder (`python benchmarks/bench_x.py` puts it on sys.path).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished (reaped) children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object], cpu: list[float]) -> float:
    """Wall seconds of `fn()`; its CPU seconds are appended to `cpu`."""
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    cpu.append(cpu_seconds() - c)
    return wall


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """The median, min and max of repeated measurements (rounds), each formatted with `fmt`."""
    return (f"median {fmt.format(statistics.median(values))}, min {fmt.format(min(values))}, "
            f"max {fmt.format(max(values))}")
