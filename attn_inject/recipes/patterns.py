"""Recipe patterns (``include:`` / ``exclude:``): regular expressions run by RE2.

A recipe, or a file's manifest, may come from anyone. Python's ``re`` backtracks, so a
pattern like ``^(.*a){10}X$`` can take minutes on one module name. RE2 (Google's engine, the
``google-re2`` package) runs in time linear in the name's length and in bounded memory, and
refuses what it cannot run that way (backreferences, lookarounds) when the recipe is read.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from ..core.errors import AttnInjectError

__all__ = ["MAX_PATTERN", "PatternError", "compile_pattern", "search"]

MAX_PATTERN = 1_000  # characters
MAX_MEMORY = 8 << 20  # bytes RE2 may use for one compiled pattern


class PatternError(AttnInjectError, ValueError):
    """A pattern RE2 cannot run in linear time and bounded memory, or that is too long."""


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2, or :class:`PatternError` saying why not."""
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"{len(pattern):,} characters long; at most {MAX_PATTERN:,} are allowed")
    options = re2.Options()
    options.max_mem = MAX_MEMORY
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"{reason} (patterns run on RE2, in time linear in the name: no backreferences or lookarounds)"
        ) from None


def search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches anywhere in ``text`` (``re.search``'s semantics)."""
    return compile_pattern(pattern).search(text) is not None
