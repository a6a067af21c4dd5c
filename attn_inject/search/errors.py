"""The errors a search raises for its own inputs."""

from __future__ import annotations

from ..core.errors import AttnInjectError

__all__ = ["SearchError", "SearchUsageError"]


class SearchError(AttnInjectError, ValueError):
    """A search that cannot run as asked: one line that says why, nothing written."""


class SearchUsageError(SearchError):
    """A command line of ``attn-inject search`` that is wrong in itself (exit code 2)."""
