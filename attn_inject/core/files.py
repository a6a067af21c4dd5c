"""Files: written whole or not at all (every file the package writes goes through
:func:`atomic_path`), and read only when they are regular files (:func:`open_regular`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import AttnInjectError

__all__ = [
    "NotRegularFileError",
    "atomic_path",
    "file_kind",
    "open_regular",
    "temporary_name",
    "write_atomic",
    "write_text_atomic",
]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a regular file"),
)


def file_kind(mode: int) -> str:
    """What a file is, from its ``st_mode``, as a message names it: 'a FIFO (named pipe)',
    'a character device' (``/dev/zero``), 'a folder'..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class NotRegularFileError(AttnInjectError, ValueError):
    """A path to read that is a folder, a FIFO, a device or a socket, not a regular file."""

    def __init__(self, path: Path, mode: int) -> None:
        self.path, self.mode = path, mode
        super().__init__(f"{path}: {file_kind(mode)}, not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary, when it is a regular file (links followed);
    else :class:`NotRegularFileError`. A FIFO or a device is opened without blocking and
    never read: ``/dev/zero`` never ends, a FIFO waits for a writer. ``OSError`` as ``open``
    raises it (``FileNotFoundError``, ``PermissionError``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
