"""Type guards for values read from files and arguments: in Python a ``bool`` is an
``int``, and a recipe's ``ratio: true`` must not pass as 1."""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = ["CONSTANT_TYPES", "is_int", "is_number"]

# the plain values a graph holds as constants and generated code writes as literals
CONSTANT_TYPES = (type(None), bool, int, float, str)


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
