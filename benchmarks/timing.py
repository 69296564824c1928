"""Alternating timer: every benchmark is a ratio of two (or more) things timed in turn in one run.

The CPU is shared with other jobs, so an absolute time means little; timing A and B alternately makes
their ratio robust to load that drifts during the run. Each repeat starts one callable further along
(A B, B A, A B, ...), so a load change mid-repeat does not always hit the same one. Report the median of
the per-repeat ratios (`median_ratio`): A and B of one repeat ran back to back under the same load, while
the medians of A and of B separately can land in different load phases when the load is bimodal.
"""

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued device work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_alternately(
    fns: Sequence[Callable[[], object]], repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu",
    samples: list[list[float]] | None = None, cpu_samples: list[list[float]] | None = None,
) -> list[float]:
    """Median wall time in seconds of each callable, timed alternately.

    Args:
        fns: callables without arguments; their results are discarded.
        repeats: timed calls of each callable.
        warmup: untimed calls of each callable first (allocator, kernels, caches).
        device: synchronized before and after every timed call when it is a GPU.
        samples: if given, receives one list of raw wall times per callable.
        cpu_samples: if given, receives this process's CPU time per call (all threads summed): with one
            thread and other jobs on the machine, an estimate of what the call would take on an idle core.

    Returns:
        the median time of each callable, in the order of `fns`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for i in range(len(fns)):
            j = (i + r) % len(fns)  # rotate the start so no callable always runs first
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[j]()
            sync()
            times[j].append(time.perf_counter() - start)
            cpu[j].append(time.process_time() - cpu_start)
    if samples is not None:
        samples[:] = times
    if cpu_samples is not None:
        cpu_samples[:] = cpu
    return [statistics.median(t) for t in times]


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats r of a[r] / b[r] (raw times of two callables from one `time_alternately`)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
