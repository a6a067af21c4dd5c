"""Results kept across calls: a bounded table, least recently used first out, safe to share
between threads. Each entry may hold objects alive beside its value (those its key names by
identity, so that no other object can take their ids while the entry is kept).
:func:`forget_kept_results` empties every table."""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["Kept", "forget_kept_results"]

V = TypeVar("V")


class Kept(Generic[V]):
    """At most ``size`` results by key; :meth:`get` computes one that is not kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[Hashable, tuple[V, Any]] = collections.OrderedDict()
        self._lock = threading.Lock()
        _TABLES.add(self)

    def get(self, key: Hashable, compute: Callable[[], V], held: Any = None) -> V:
        """The value kept under ``key``, else ``compute()``'s, kept with ``held``."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = compute()
        self.put(key, value, held)
        return value

    def put(self, key: Hashable, value: V, held: Any = None) -> None:
        """Keep ``value`` under ``key`` (with ``held``), the least recently used out past ``size``."""
        with self._lock:
            self._entries[key] = (value, held)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is kept (it becomes the most recently used)."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_TABLES: weakref.WeakSet[Kept[Any]] = weakref.WeakSet()


def forget_kept_results() -> None:
    """Empty every table of results kept across calls (planning's slot verdicts and built-in
    blocks' costs, the proved block designs), so that the next ``inject`` computes them as a
    process's first does."""
    for table in list(_TABLES):
        table.clear()
