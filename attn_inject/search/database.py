"""A SQLite study database, checked before Optuna opens it, and bounded while it is used.

A ``study.db`` is a file like any other that someone hands us; what it holds may shape data,
never code, places or unbounded time and memory:

- **Where**: the default storage ``OUT/study.db`` (and SQLite's ``-journal``, ``-wal`` and
  ``-shm`` beside it) is absent or a regular file, not a link (``lstat``), inside ``--out``:
  SQLite would create or change whatever a link leads to.
- **What**: before Optuna opens an existing SQLite file, a read-only connection checks that
  its schema holds only the tables and indexes of the installed Optuna's own schema (its
  models' metadata, created in memory, and alembic's version table): no view, no trigger,
  so no SQL the file carries ever runs; that no value is longer than
  :data:`MAX_VALUE_BYTES`; and that the schema revision and version it records, if any,
  are the installed Optuna's: Optuna adds the tables it misses to a file of another version
  before it refuses it, and the file is never migrated.
- **How long, how large**: every connection to a SQLite storage (:func:`engine_kwargs`)
  stops a statement that runs past :data:`STATEMENT_SECONDS` and refuses a string or blob
  over :data:`MAX_VALUE_BYTES` (SQLite's own length limit), each as one line naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.files import file_kind
from ..core.messages import error_line, first_line, shown
from .errors import SearchError
from .study_files import link_or_kind

__all__ = [
    "MAX_VALUE_BYTES",
    "STATEMENT_SECONDS",
    "StudyDatabaseError",
    "check_default_storage",
    "check_sqlite",
    "engine_kwargs",
    "naming",
    "optuna_schema",
    "sqlite_file",
]

STATEMENT_SECONDS = 60.0  # one statement on a SQLite storage; Optuna's take milliseconds
MAX_VALUE_BYTES = 64 << 20  # one string or blob in the study (an attribute's JSON, a name)
PROGRESS_OPS = 10_000  # SQLite instructions between two looks at the clock
SIDECARS = ("", "-journal", "-wal", "-shm")  # the database and the files SQLite keeps beside it


class StudyDatabaseError(SearchError):
    """A study database that is not one, or that ran a statement past its time: the search
    stops (no trial is to blame)."""


class _GuardedCursor(sqlite3.Cursor):
    """A cursor whose statements each get :data:`STATEMENT_SECONDS` from their start, and
    whose stopped or oversized statements raise :class:`StudyDatabaseError`."""

    connection: _GuardedConnection

    def _run(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except sqlite3.Error as error:
            explained = self.connection.explained(error)
            if explained is error:
                raise  # SQLite's own, for SQLAlchemy to wrap
            raise explained from None

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        self.connection.started()
        return self._run(super().execute, sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        self.connection.started()
        return self._run(super().executemany, sql, parameters)

    def fetchone(self) -> Any:
        return self._run(super().fetchone)

    def fetchmany(self, size: int | None = 1) -> Any:
        return self._run(super().fetchmany, size)

    def fetchall(self) -> Any:
        return self._run(super().fetchall)


class _GuardedConnection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=_GuardedConnection)``: a connection that stops any
    statement past its deadline (a progress handler) and reads or makes no string or blob
    over :data:`MAX_VALUE_BYTES`."""

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        self.where = str(database)
        self.deadline = math.inf
        self.stopped = False
        limit = getattr(self, "setlimit", None)  # Python 3.11+; on 3.10 the check before opening
        if limit is not None:  # bounds the values the file holds
            limit(getattr(sqlite3, "SQLITE_LIMIT_LENGTH", 0), MAX_VALUE_BYTES)
        self.set_progress_handler(self._past, PROGRESS_OPS)

    def _past(self) -> int:
        self.stopped = time.monotonic() > self.deadline
        return int(self.stopped)

    def started(self) -> None:
        self.deadline = time.monotonic() + STATEMENT_SECONDS
        self.stopped = False

    def cursor(self, factory: Any = _GuardedCursor) -> Any:
        return super().cursor(factory)

    def commit(self) -> None:
        self.started()
        try:
            super().commit()
        except sqlite3.Error as error:
            explained = self.explained(error)
            if explained is error:
                raise
            raise explained from None

    def rollback(self) -> None:
        self.started()
        super().rollback()

    def explained(self, error: sqlite3.Error) -> Exception:
        """``error`` as one line naming the file, when it is one of the guard's; else itself."""
        if self.stopped:
            return StudyDatabaseError(
                f"{self.where}: a statement on the study database ran past {STATEMENT_SECONDS:g} s "
                "and was stopped (SQL the file carries, or a damaged file); each may take at most "
                f"{STATEMENT_SECONDS:g} s"
            )
        if "too big" in str(error):
            return StudyDatabaseError(
                f"{self.where}: a value in the study database is over {MAX_VALUE_BYTES:,} bytes; "
                f"each value may hold at most {MAX_VALUE_BYTES:,}"
            )
        return error


def sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names; None for another database, or SQLite in memory."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None  # Optuna says why, naming the URL
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def engine_kwargs(url: str) -> dict[str, Any]:
    """What Optuna's ``RDBStorage`` passes to SQLAlchemy so that every connection to a SQLite
    storage is guarded; nothing for another database."""
    if sqlite_file(url) is None:
        return {}
    return {"connect_args": {"factory": _GuardedConnection}}


def check_default_storage(out: Path) -> Path:
    """``OUT/study.db`` if it and SQLite's files beside it are each absent or a regular file
    (not a link, a folder or a FIFO); StudyDatabaseError otherwise."""
    path = out / "study.db"
    for sidecar in SIDECARS:
        name = path.with_name(path.name + sidecar)
        kind = link_or_kind(name, "a regular file")
        if kind is not None:
            raise StudyDatabaseError(
                f"{name}: {kind}; the study database (and SQLite's {name.name[:8]}-journal, -wal, "
                "-shm) must be a regular file inside --out, or absent"
            )
    return path


@functools.cache
def optuna_schema() -> frozenset[tuple[str, str]]:
    """The (type, name) of every table and index in a new study database of the installed
    Optuna: its models' metadata created in memory, and alembic's version table, which
    Optuna's storage stamps."""
    import sqlalchemy
    from alembic.runtime.migration import MigrationContext
    from optuna.storages._rdb import models

    engine = sqlalchemy.create_engine("sqlite://")
    try:
        models.BaseModel.metadata.create_all(engine)
        with engine.begin() as connection:
            MigrationContext.configure(connection)._ensure_version_table()
            rows = connection.exec_driver_sql("SELECT type, name FROM sqlite_master").fetchall()
    finally:
        engine.dispose()
    return frozenset((str(kind), str(name)) for kind, name in rows)


def check_sqlite(path: Path) -> None:
    """Refuse (StudyDatabaseError, one line) an existing SQLite study database whose schema
    holds anything but Optuna's tables and indexes, a value over :data:`MAX_VALUE_BYTES`, or
    another Optuna's schema revision; read-only, guarded, before Optuna opens it. An absent
    file is fine (Optuna creates it)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):  # a FIFO would block the read-only open for ever
        raise StudyDatabaseError(f"{path}: {file_kind(mode)}; a study database is a regular file")
    allowed = optuna_schema()
    tables = sorted(name for kind, name in allowed if kind == "table")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, factory=_GuardedConnection)) as db:
            db.where = str(path)
            cursor = db.cursor()
            rows = cursor.execute("SELECT type, name FROM sqlite_master").fetchall()
            for kind, name in sorted(rows, key=lambda row: row[0] in ("table", "index")):  # views first
                if (kind, name) not in allowed:
                    raise StudyDatabaseError(
                        f"{path}: the study database holds {kind} {shown(name)}, which Optuna's schema "
                        f"does not; a study database may hold only Optuna's tables ({', '.join(tables)}) "
                        "and their indexes: no view, no trigger"
                    )
            for kind, table in rows:
                if kind == "table":
                    _check_lengths(cursor, path, table)
            # Optuna adds tables to a file of another version, and stamps it, before it refuses it
            _check_revision(cursor, path, {name for kind, name in rows if kind == "table"})
    except sqlite3.Error as error:
        raise StudyDatabaseError(
            f"{path}: cannot read it as a study database ({first_line(error, 120)}); "
            "a study database is a SQLite file written by Optuna"
        ) from None


@functools.cache
def _optuna_revision() -> str:
    """The schema revision (alembic head) of the installed Optuna's study databases."""
    from alembic.script import ScriptDirectory
    from optuna.storages._rdb import storage

    return str(ScriptDirectory(os.path.join(os.path.dirname(storage.__file__), "alembic")).get_current_head())


def _check_revision(cursor: sqlite3.Cursor, path: Path, tables: set[str]) -> None:
    """The schema revision and version the file records, where it records them, the installed
    Optuna's."""
    from optuna.storages._rdb import models

    for table, column, what, want in (
        ("alembic_version", "version_num", "revision", _optuna_revision()),
        ("version_info", "schema_version", "version", models.SCHEMA_VERSION),
    ):
        if table not in tables:
            continue
        for (value,) in cursor.execute(f"SELECT {column} FROM {table}").fetchall():
            if value != want:
                raise StudyDatabaseError(
                    f"{path}: the study database has Optuna schema {what} {shown(value)}, not this "
                    f"Optuna's {want!r}; it is opened only as it is, never migrated: upgrade a copy "
                    "(optuna storage upgrade), or use another --out"
                )


def _check_lengths(cursor: sqlite3.Cursor, path: Path, table: str) -> None:
    """Every value of ``table`` (a name from Optuna's schema) at most MAX_VALUE_BYTES long."""
    columns = [str(row[1]) for row in cursor.execute(f"PRAGMA table_info({_quoted(table)})").fetchall()]
    if not columns:
        return
    longest = ", ".join(f"max(length({_quoted(c)}))" for c in columns)
    lengths = cursor.execute(f"SELECT {longest} FROM {_quoted(table)}").fetchone() or ()
    for column, length in zip(columns, lengths, strict=False):
        if isinstance(length, int) and length > MAX_VALUE_BYTES:
            raise StudyDatabaseError(
                f"{path}: {table}.{column} holds a value of {length:,} characters; each value may "
                f"hold at most {MAX_VALUE_BYTES:,}"
            )


def _quoted(name: str) -> str:
    """``name`` as a SQL identifier (a column's name is the file's: any text)."""
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def naming(where: str) -> Iterator[None]:
    """An error met while the study is read or written, as one line naming the storage
    (``where``): a malformed row (a date that is none, JSON nested 100,000 deep, a state
    Optuna does not have) is the file's fault. The search's own refusals pass as they are."""
    try:
        yield
    except SearchError:
        raise
    except Exception as error:
        raise StudyDatabaseError(
            f"{where}: cannot read the study in it: {error_line(error, 200)}; "
            "a study database holds what Optuna writes (move the file away, or use another --out)"
        ) from None
