"""Words with a few possible values (a tensor layout, how a block is attached, how it is
initialised): an enum that is also its text, so a plan, a manifest or a JSON file holds the
plain string, and a member compares, hashes, prints and formats as that string."""

from __future__ import annotations

import enum

__all__ = ["Word"]


class Word(str, enum.Enum):
    """An enum whose members are their values: ``Layout.NCHW == "NCHW"``, ``str()``,
    ``repr()`` and f-strings show the value, ``json.dumps`` writes it."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every member's text, in definition order."""
        return tuple(member.value for member in cls)
