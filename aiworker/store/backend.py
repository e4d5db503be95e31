"""Where the state lives: the embedded SQLite file, or a PostgreSQL server shared by several
receivers and workers (``state.url``). Both run the same SQL.

The store modules write SQLite's dialect (``?`` placeholders, ``REAL``/``INTEGER`` columns);
:class:`PostgresBackend` turns it into PostgreSQL's: ``%s`` placeholders, ``DOUBLE
PRECISION`` and ``BIGINT`` columns, ``BIGSERIAL`` keys, booleans written as integers and
``NUMERIC`` sums read back as numbers. A row reads by column name and by position, as
``sqlite3.Row`` does.

Writes are serialised like SQLite's: every write transaction first takes one PostgreSQL
advisory lock, so the completion rules and the job claims of several processes see each
other's changes in order (the transactions are a few milliseconds long). The procrastinate
schema (its jobs, workers and events tables) is created with the state's tables when it is
missing.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.adapt import Loader

WRITE_LOCK = 7_251_301  # the advisory lock every write transaction takes (any constant)
STATE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


class StateURLError(ValueError):
    """A ``state.url`` that names no backend this node speaks."""


def describe(location: Path | str) -> str:
    """The state's location for logs and errors: a PostgreSQL URL without its password."""
    if isinstance(location, Path):
        return str(location)
    parts = urlsplit(location)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{host}{port}{parts.path}"


def is_postgres(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def check_url(url: str) -> str:
    """``url`` when it is a PostgreSQL URL with a host and a database; raises
    :class:`StateURLError` saying what is wrong otherwise."""
    if not is_postgres(url):
        raise StateURLError(f"state.url must be postgresql://USER[:PASS]@HOST:PORT/DB, not "
                            f"{url.split('://')[0]!r}://...")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise StateURLError(f"state.url {describe(url)}: the port is not a number") from exc
    if not parts.hostname or parts.path in ("", "/"):
        raise StateURLError(f"state.url {describe(url)}: give a host and a database name")
    return url


class Row(tuple):
    """One result row: by position (``row[0]``, unpacking) and by name (``row["id"]``,
    ``dict(row)``)."""

    names: tuple[str, ...]

    def __new__(cls, names: tuple[str, ...], values: Sequence[Any]) -> Row:
        row = super().__new__(cls, values)
        row.names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        return self.names


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names = tuple(column.name for column in cursor.description or ())
    return lambda values: Row(names, values)


class _NumberLoader(Loader):
    """NUMERIC (what SUM and AVG give in PostgreSQL) as an int when whole, else a float."""

    def load(self, data: Any) -> int | float:
        number = Decimal(bytes(data).decode())
        return int(number) if number == number.to_integral_value() else float(number)


class PostgresCursor:
    """A psycopg cursor that takes the store's SQLite-dialect statements."""

    def __init__(self, cursor: psycopg.Cursor):
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PostgresCursor:
        self._cursor.execute(to_postgres(sql),
                             tuple(int(p) if isinstance(p, bool) else p for p in params))
        return self

    def execute_script(self, sql: str) -> None:
        """Run several statements as they are (no placeholders): a schema."""
        self._cursor.execute(sql)  # type: ignore[arg-type]

    def fetchone(self) -> Row | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Row]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description


_TYPES = [(re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGSERIAL PRIMARY KEY"),
          (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
          (re.compile(r"\bINTEGER\b"), "BIGINT")]


def to_postgres(sql: str) -> str:
    """A statement in the store's dialect, in PostgreSQL's."""
    if sql.lstrip().upper().startswith(("CREATE TABLE", "ALTER TABLE")):
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
    return sql.replace("%", "%%").replace("?", "%s")


class SqliteBackend:
    """The embedded state: one SQLite file (WAL) under the data dir, one connection."""

    kind = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float = 10.0):
        """``busy_timeout_s``: how long a write waits for another writer's lock."""
        self.location = Path(path)
        self.location.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.location, check_same_thread=False,
                                     isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresBackend:
    """A shared PostgreSQL database: one connection per process part, writes serialised by
    an advisory lock."""

    kind = "postgresql"

    def __init__(self, url: str, connect_timeout_s: float = 10.0):
        self.location = check_url(url)
        self._conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory,
                                     connect_timeout=max(1, round(connect_timeout_s)))
        self._conn.adapters.register_loader("numeric", _NumberLoader)
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[PostgresCursor]:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield PostgresCursor(cur)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return PostgresCursor(self._conn.cursor()).execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


Backend = SqliteBackend | PostgresBackend


def open_backend(location: Path | str, busy_timeout_s: float = 10.0) -> Backend:
    """The backend of ``location``: a PostgreSQL URL, else the path of a SQLite file (whose
    writes wait up to ``busy_timeout_s`` for another writer)."""
    if is_postgres(location):
        return PostgresBackend(str(location))
    if isinstance(location, str) and "://" in location:
        check_url(location)  # raises, naming the scheme
    return SqliteBackend(Path(location), busy_timeout_s)
