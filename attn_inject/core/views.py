"""A live view of a registry's names: read at each use, so it follows every registration."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from typing import TypeVar, overload

from .errors import InputError
from .messages import shown

__all__ = ["NamesView", "unregistered"]

V = TypeVar("V")


class NamesView(Sequence[str]):
    """The names ``names()`` gives now, as a read-only sequence: a name registered or
    unregistered later is in it or gone from it. Compares equal to the tuple of the names.

    >>> CHECKS = NamesView(check_names)
    >>> "identity" in CHECKS, CHECKS == ("reference", "identity", ...)
    """

    def __init__(self, names: Callable[[], tuple[str, ...]]) -> None:
        self._names = names

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NamesView):
            return self._names() == other._names()
        return isinstance(other, tuple) and self._names() == other

    __hash__ = None  # type: ignore[assignment]  # its value changes as names are registered

    def __repr__(self) -> str:
        return repr(self._names())


def unregistered(table: dict[str, V], name: str, built_in: Container[str], what: str, plural: str) -> V:
    """Remove ``name`` from a registry ``table`` and return its entry; a built-in name or one
    never registered is one :class:`InputError` naming what is registered (``what`` and
    ``plural`` name the kind: "block", "kinds"). Where ``built_in`` maps each built-in name to
    the package's own entry, a built-in name registered again over it gets that entry back,
    and the replacing one is returned: the registry is as it was before the replacement."""
    if name in built_in:
        original = built_in.get(name) if isinstance(built_in, Mapping) else None
        if original is not None and table.get(name) is not original:
            replacing = table[name]
            table[name] = original
            return replacing
        raise InputError(
            f"{what} {shown(name)} is built in and cannot be unregistered; registered {plural} can"
        )
    if name not in table:
        added = ", ".join(n for n in table if n not in built_in) or "none"
        raise InputError(f"{what} {shown(name)} is not registered; registered {plural}: {added}")
    return table.pop(name)
