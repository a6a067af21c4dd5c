"""The command line's own errors, by exit code."""

from __future__ import annotations

from ..core.errors import AttnInjectError

__all__ = ["CommandError", "UsageError"]


class UsageError(AttnInjectError):
    """Bad command-line input: exit code 2 (as is a fine-tune's ``SettingError``)."""


class CommandError(AttnInjectError):
    """The command cannot go on (e.g. its output exists): exit code 1."""
