"""The error a search raises for its own inputs."""

from __future__ import annotations

from ..errors import AttnInjectError

__all__ = ["SearchError"]


class SearchError(AttnInjectError, ValueError):
    """A search that cannot run as asked: one line that says why, nothing written."""
