"""Interleaved timing: candidates run in turn, round after round, and medians are compared."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, sync: bool = False
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternation over ``rounds``."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float], peer: str) -> None:
    print(f"{title}\n  machine: {machine()}")
    for name, seconds in medians.items():
        print(f"  {name:<34} median {seconds * 1e3:9.2f} ms   ratio to {peer}: {seconds / medians[peer]:.3f}")
