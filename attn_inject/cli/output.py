"""What the commands show: their result as text or JSON on stdout, a spinner or a progress
bar on stderr while they work, and the plan of a model ``inject`` returned."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from ..core.errors import InputTypeError
from ..planning.points import Plan
from ..surgery.record import patched_record

if TYPE_CHECKING:
    from torch import nn

__all__ = ["emit", "plan_of", "progress", "status"]


def emit(args: argparse.Namespace, text: str, data: Any) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, indent=2) if args.json else text)


def plan_of(patched: nn.Module) -> Plan:
    """The plan ``inject`` recorded on the model it returned."""
    info = patched_record(patched)
    if info is None:
        raise InputTypeError(f"{type(patched).__name__} has no attn_inject plan: not a model inject returned")
    return info.plan


def status(message: str, *, quiet: bool = False):
    """A spinner on stderr while a long step runs (nothing when quiet or without rich)."""
    if quiet:
        return contextlib.nullcontext()
    try:
        from rich.console import Console
    except ImportError:
        return contextlib.nullcontext()
    return Console(stderr=True).status(message)


def progress(description: str, total: int, *, quiet: bool = False):
    """A context manager yielding ``advance(label)``: a progress bar on stderr."""

    @contextlib.contextmanager
    def plain():
        """Not a terminal (a log file, CI): a line every 5%."""
        start, done, step = time.perf_counter(), [0], max(1, total // 20)

        def advance(label: str) -> None:
            done[0] += 1
            if not quiet and (done[0] % step == 0 or done[0] == total):
                elapsed = time.perf_counter() - start
                left = elapsed / done[0] * (total - done[0])
                print(
                    f"{description}: {done[0]}/{total} ({elapsed:.0f} s, about {left:.0f} s left) {label}",
                    file=sys.stderr,
                    flush=True,
                )

        yield advance

    @contextlib.contextmanager
    def bar():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"),
        )
        with Progress(*columns, console=Console(stderr=True), disable=quiet) as progress:
            task = progress.add_task(description, total=total, last="")
            yield lambda label: progress.update(task, advance=1, last=label)

    return bar() if sys.stderr.isatty() else plain()
