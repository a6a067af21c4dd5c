"""Qualified module names (``layer1.0.conv1``): joining them and reading one from inside
another."""

from __future__ import annotations

__all__ = ["join_names", "relative_name"]


def join_names(*parts: str) -> str:
    """``parts`` joined by dots, empty parts (the root) left out."""
    return ".".join(p for p in parts if p)


def relative_name(path: str, root: str) -> str:
    """``path`` as named from module ``root`` ('' when it is ``root``); a path outside
    ``root`` is returned as it is."""
    if not root:
        return path
    if path == root:
        return ""
    return path[len(root) + 1 :] if path.startswith(root + ".") else path
