"""One timing loop for the engine benchmarks (bench_engine.py and its Flux/SD3 runs)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: (wall s, process CPU s, peak GPU bytes) of one run.
Timing = tuple[float, float, int]


def timed(fn: Callable[[], object], cuda: bool) -> Timing:
    """One run of ``fn``: on a shared CPU box the CPU time is steadier than the wall time."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return time.perf_counter() - start, time.process_time() - cpu, peak


def interleaved(
    baseline: Callable[[], object], ours: Callable[[], object], repeats: int, cuda: bool
) -> tuple[dict[str, float], list[Timing], list[Timing]]:
    """A warm-up of each, then at least 3 runs of each, interleaved so that a change in the
    machine's load hits both alike: (first-run seconds, baseline timings, our timings)."""
    first = {"img2img": timed(baseline, cuda)[0], "collage": timed(ours, cuda)[0]}
    base_runs: list[Timing] = []
    our_runs: list[Timing] = []
    for _ in range(max(3, repeats)):
        base_runs.append(timed(baseline, cuda))
        our_runs.append(timed(ours, cuda))
    return first, base_runs, our_runs
