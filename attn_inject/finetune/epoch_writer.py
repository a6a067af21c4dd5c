"""An epoch's files written on a thread of their own while the next epoch trains::

    main thread:  ... train ─ evaluate ─ snapshot ─┬─ train the next epoch ...
    writer:                                        └─ last/best.safetensors, resume.pth,
                                                      summary.csv, curves.png

The writer gets a snapshot taken when the epoch ends: every tensor copied to the CPU (into
the previous epoch's copies where shapes and dtypes match, so that after the first epoch
nothing is allocated), every container rebuilt, so that the next epoch's steps cannot change
what is written. One write at a time, in order: a snapshot waits for the write before it.
The run waits for the last write before it returns or raises (a stop by SIGTERM included,
the signal's exception held until the write is done), so every file is whole when the run
ends, renamed from its temporary, and no temporary is left. A write that fails raises in
the run, at the next epoch's end or at the run's end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["EpochWriter", "copied", "epoch_writer"]


def copied(value: Any, previous: Any = None) -> Any:
    """``value`` (nested dicts, lists and tuples of tensors and plain values) with every
    tensor copied to the CPU, into the tensor at the same place in ``previous`` when that
    one has the same shape, strides and dtype; the containers are new, other values deep
    copies. Nothing in the result shares memory with ``value``."""
    if isinstance(value, torch.Tensor):
        source = value.detach()
        if (
            isinstance(previous, torch.Tensor)
            and previous.device.type == "cpu"
            and previous.dtype == source.dtype
            and previous.shape == source.shape
            and previous.stride() == source.stride()
            and source.layout == torch.strided
        ):
            return previous.copy_(source)
        if source.device.type == "cpu":
            return source.clone()
        return source.to("cpu")
    if type(value) in (dict, OrderedDict):  # a state dict is an OrderedDict with _metadata
        before = previous if isinstance(previous, dict) else {}
        out = type(value)((k, copied(v, before.get(k))) for k, v in value.items())
        if hasattr(value, "__dict__"):
            vars(out).update(copy.deepcopy(vars(value)))
        return out
    if type(value) in (list, tuple):
        same = type(previous) is type(value) and len(previous) == len(value)
        items = [copied(v, previous[i] if same else None) for i, v in enumerate(value)]
        return type(value)(items)
    return copy.deepcopy(value)


class EpochWriter:
    """Runs one write at a time on a thread of its own (see the module docstring)."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="attn-inject-writer")
        self._pending: concurrent.futures.Future[None] | None = None
        self._copies: Any = None

    def snapshot(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` copied (:func:`copied`) once the write before has ended, its tensors
        into that write's copies."""
        self.wait()
        self._copies = copied(state, self._copies)
        return self._copies

    def submit(self, write: Callable[[], None]) -> None:
        """Start ``write`` once the write before has ended (its error raised here)."""
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Wait for the write under way, if any, and raise its error. A signal's exception
        that lands meanwhile is raised once the write is done."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        interrupted: BaseException | None = None
        while True:
            try:
                concurrent.futures.wait([pending])
                break
            except BaseException as error:  # SIGTERM, SIGINT: the file is finished first
                interrupted = interrupted or error
        if interrupted is not None:
            raise interrupted
        pending.result()

    def close(self, raising: bool = True) -> None:
        """Wait for the last write and end the thread; its error is raised when ``raising``."""
        try:
            if raising:
                self.wait()
            else:
                with contextlib.suppress(Exception):
                    self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._copies = None


@contextlib.contextmanager
def epoch_writer() -> Iterator[EpochWriter]:
    """An :class:`EpochWriter` whose last write has ended when the block is left; a failed
    write is raised unless the block raises already (its exception goes on)."""
    writer = EpochWriter()
    try:
        yield writer
    except BaseException:
        writer.close(raising=False)
        raise
    writer.close()
