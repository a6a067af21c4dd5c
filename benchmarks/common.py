"""What every benchmark shares: the machine's name, interleaved timing (candidates run in
turn, round after round, medians compared, or ratios taken within each round), peak
memory, and markdown output.

Each script takes ``--quick`` (a smoke run at tiny sizes: checks the script still works,
its figures mean nothing) and ``--out FILE.md`` (its results as a markdown section, which
``collect.py`` gathers into ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attn_inject.core.tables import markdown_table


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, torch threads, GPU, torch version, and the interpreter (how it was
    built moves pure-Python timings by a fifth)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    interpreter = getattr(sys, "_base_executable", sys.executable)  # a venv's own base
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()} ({interpreter})"
    )


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    sync: bool = False,
    warmup: int = 1,
    collect_garbage: bool = False,
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in alternation over ``rounds``;
    ``collect_garbage``: Python's cyclic garbage collected before each timed call, so that a
    candidate does not pay for the cycles the one before it left (fx graphs are cycles)."""
    times = interleaved_times(candidates, rounds, sync, warmup, collect_garbage)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    sync: bool = False,
    warmup: int = 1,
    collect_garbage: bool = False,
    rotate: bool = False,
) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, round by round (see :func:`interleaved`);
    ``rotate``: each round starts one candidate later than the one before, so that no
    candidate always runs right after the same other one (a call that leaves the caches or
    the allocator warm or cold for the next would otherwise favour one side every round)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    names = list(candidates)
    with _heap_frozen() if collect_garbage else contextlib.nullcontext():
        for r in range(rounds):
            shift = r % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                if collect_garbage:
                    gc.collect()
                if sync:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                candidates[name]()
                if sync:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class RoundRatio:
    """A candidate's time over a peer's, taken within each round: the median of the rounds'
    ratios and their interquartile range (how far one round's ratio strays: a machine whose
    run times move by a tenth between rounds cannot show a 3% difference in a few rounds)."""

    median: float
    low: float  # first quartile
    high: float  # third quartile

    def __str__(self) -> str:
        return f"{self.median:.3f}; IQR {self.low:.3f}-{self.high:.3f}"


def round_ratio(times: Sequence[float], peer_times: Sequence[float]) -> RoundRatio:
    """``times`` over ``peer_times`` round by round (both from one :func:`interleaved_times`)."""
    ratios = [t / p for t, p in zip(times, peer_times, strict=True)]
    if len(ratios) < 2:
        return RoundRatio(ratios[0], ratios[0], ratios[0])
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return RoundRatio(statistics.median(ratios), low, high)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Within: what the process held before, garbage included, is left out of every
    collection (``gc.freeze``), so that collecting the candidates' own garbage costs the same
    in a small script as in a large process (a test run holding thousands of models' objects)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in KiB, None where absent."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def _rss_peak_kib() -> int | None:
    return _proc_status_kib("VmHWM")


def _rss_kib() -> int | None:
    return _proc_status_kib("VmRSS")


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """MiB by which one call of ``fn`` raises peak memory above what was in use before it:
    CUDA's peak allocation on a GPU, the process's peak resident set on Linux (reset through
    ``/proc/self/clear_refs``); ``None`` where neither can be measured."""
    with _heap_frozen():
        return _peak_memory(fn, device)


def _peak_memory(fn: Callable[[], object], device: torch.device | str) -> float | None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_kib()
    fn()
    peak = _rss_peak_kib()
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def backward_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    """One timed call: ``fn(x)`` forward and backward (``x`` requires grad), for ``interleaved``."""

    def call() -> object:
        x.grad = None
        fn(x).sum().backward()
        return x.grad

    return call


@dataclass
class Table:
    """One result table: a title, a note, column names and rows."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += markdown_table(self.columns, self.rows)
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        cells = [list(self.columns), *[list(r) for r in self.rows]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)


def report(title: str, medians: dict[str, float], peer: str) -> None:
    """Print each candidate's median and its ratio to ``peer``, naming the machine."""
    print(f"{title}\n  machine: {machine()}")
    for name, seconds in medians.items():
        print(f"  {name:<34} median {seconds * 1e3:9.2f} ms   ratio to {peer}: {seconds / medians[peer]:.3f}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run at tiny sizes (figures mean nothing)")
    p.add_argument("--out", metavar="FILE.md", help="write the results as a markdown section")
    return p


def emit(section: str, tables: Sequence[Table], out: str | None, quick: bool) -> str:
    """Print the tables; write them to ``out`` as a markdown section naming the machine."""
    for table in tables:
        print(table.text())
        print()
    text = f"## {section}\n\nMachine: {machine()}.\n\n"
    if quick:
        text += "**Smoke run (`--quick`): tiny sizes, one round; these figures mean nothing.**\n\n"
    text += "\n".join(t.markdown() for t in tables)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    return text


def block_workload(quick: bool) -> tuple[torch.device, int, tuple[tuple[int, int, int], ...], int]:
    """Device, batch, (C, H, W) maps and rounds of the block benchmarks: a ResNet-50 stage-2
    and stage-4 map at batch 16 over 20 rounds (``--quick``: one tiny map, one round)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        return device, 2, ((32, 8, 8),), 1
    return device, 16, ((256, 56, 56), (1024, 14, 14)), 20
