"""The intra-op threads a run uses: chosen from the cores, stated, and put back afterwards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .config import FinetuneConfig
from .distributed import Context

__all__ = ["default_threads", "threads_line", "using_threads"]


def default_threads(workers: int) -> tuple[int, int]:
    """(intra-op threads per process, cores): this process's share of the cores it may run
    on (torchrun's processes on one machine share them), less one for the data loader
    workers when there are any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, share - (1 if workers > 0 and share > 1 else 0)), cores


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{plural if n != 1 else ''}"


@contextlib.contextmanager
def using_threads(config: FinetuneConfig) -> Iterator[None]:
    """Run with the chosen intra-op threads; the caller's setting is put back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads(config.workers)[0])
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def threads_line(config: FinetuneConfig, context: Context) -> str:
    """The log's first line: how the run uses the machine's cores."""
    _, cores = default_threads(config.workers)
    threads, processes = torch.get_num_threads(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = _count(config.workers, "data loader worker")
    where = f"{_count(processes, 'process', 'es')} on {_count(cores, 'core')}"
    threads_text = _count(threads, "intra-op thread")
    return f"finetune: {threads_text} and {workers} per process, {where} (--threads, --workers)"
