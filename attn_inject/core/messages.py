"""Bounded renderings of untrusted values for one-line error messages.

A value read from a file or the command line may be huge (a YAML alias bomb expands to
millions of items) or span lines; ``shown(value)`` is always short and on one line, and costs
time in proportion to what it prints, not to the size of the value.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["MAX_SHOWN", "cut", "error_line", "first_line", "shown", "shown_apart"]

MAX_SHOWN = 80  # characters of a value that an error message quotes

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxdict = 4
_repr.maxstring = _repr.maxother = MAX_SHOWN
_repr.maxlong = 24


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, on one line."""
    text = _repr.repr(value).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cut(text: str, limit: int = 200) -> str:
    """Plain ``text`` (a message, not a value) on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's message (a library's message may run to a traceback of
    its own), cut to ``limit`` characters; '' for an empty message."""
    lines = str(error).strip().splitlines()
    return cut(lines[0], limit) if lines else ""


def error_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an error, for a report that quotes a library's failure."""
    return f"{type(error).__name__}: {first_line(error, limit)}"


_wide = reprlib.Repr()
_wide.maxlevel = 6
_wide.maxlist = _wide.maxtuple = _wide.maxset = _wide.maxdict = 64
_wide.maxstring = _wide.maxother = _wide.maxlong = 4096


def shown_apart(a: Any, b: Any, limit: int = MAX_SHOWN) -> tuple[str, str]:
    """``shown(a)`` and ``shown(b)`` for a message that compares them: each cut to ``limit``
    characters around the first character where the two differ, so that the difference
    shows (``'...runs/a/in.safetensors'`` and ``'...runs/b/in.safetensors'``, not two equal
    beginnings)."""
    left, right = (_wide.repr(v).replace("\n", "\\n").replace("\r", "\\r") for v in (a, b))
    pairs = enumerate(zip(left, right, strict=False))
    same = next((i for i, (x, y) in pairs if x != y), min(len(left), len(right)))
    start = max(0, min(same - limit // 3, max(len(left), len(right)) - limit))

    def window(text: str) -> str:
        if len(text) <= limit:
            return text
        begin = min(start, len(text) - limit)
        head = "..." if begin else ""
        tail = "..." if begin + limit < len(text) else ""
        return head + text[begin + len(head) : begin + limit - len(tail)] + tail

    return window(left), window(right)
