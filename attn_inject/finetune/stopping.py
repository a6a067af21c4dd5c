"""Stopping a run on SIGTERM or SIGINT: the stop raised where it lands, its message saying how to go on."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.messages import cut
from .config import FinetuneConfig
from .outputs import RESUME

__all__ = ["Stopped", "stoppable"]


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT); its message says how to go on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def stoppable(config: FinetuneConfig) -> Iterator[Callable[[], None]]:
    """SIGTERM and SIGINT end the run as an exception, so that no temporary file is left
    and the message says how to resume, or that nothing was saved when no epoch had ended
    (SIGTERM would otherwise kill the process as is).

    Yields ``stop_if_requested``, which the run calls after every step and epoch: a signal
    that lands in a finaliser (printed as "Exception ignored") or in a library that catches
    everything loses its exception, and the stop is raised again there."""

    def hint() -> str:
        """Read as the stop leaves the run: ``--resume`` needs a resume state to continue from."""
        if (Path(config.out) / RESUME).is_file():
            return (
                "the last finished epoch is kept: continue with the same command and --resume "
                f"(--out {cut(config.out, 200)})"
            )
        return (
            "no epoch had ended, so nothing was saved to resume from; "
            "start again with the same command and --force"
        )

    received: list[Stopped] = []

    def on_term(signum: int, frame: Any) -> None:
        received.append(Stopped("stopped by SIGTERM", 143))
        raise received[-1]

    def stop_if_requested() -> None:
        if received:
            raise received[0]

    def advised(stop: Stopped) -> Stopped:
        """The stop as it leaves the run, its advice read then: the run has waited for the
        files of its last finished epoch (written while the next one trained)."""
        return Stopped(f"{stop}; {hint()}", stop.code)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield stop_if_requested
    except Stopped as stop:
        if any(stop is mine for mine in received):
            raise advised(stop) from None
        raise  # a nested run's, advised already
    except KeyboardInterrupt:
        raise advised(Stopped("interrupted (SIGINT)", 130)) from None
    except Exception:
        # the signal arrived in code that wraps what it raises (an import's class body
        # turns it into a RuntimeError): still the signal's stop, not an error
        if received:
            raise advised(received[0]) from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
