"""Writing a file whole or not at all: every file the package writes goes through
:func:`atomic_path`."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "temporary_name", "write_atomic", "write_text_atomic"]


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A fresh hidden name next to ``path``: ``.NAME.RANDOM.tmp`` (plus ``suffix``, for a
    writer that picks its format by the name's extension)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to ``path`` to write; renamed over ``path`` when the block ends,
    removed when it raises (or the process is stopped by an exception), so ``path`` is
    either the whole new file or what it was."""
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[Path], object], *, suffix: str = "") -> None:
    """``write(tmp)`` a temporary file, then put it in place (see :func:`atomic_path`)."""
    with atomic_path(path, suffix=suffix) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` as ``path``'s whole content, written atomically, line endings as given."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))
