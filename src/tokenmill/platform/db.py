"""The database handle: one engine and two session scopes (read, write) per `Database`, built by
`open_database(url)`. SQLite serializes writers (BEGIN IMMEDIATE); PostgreSQL relies on row locks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from tokenmill.platform.errors import InvalidArgument

SQLITE_BUSY_TIMEOUT_S = 30.0
WRITE_OPTION = "tokenmill_write"
"""Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def sqlite_url(data_dir: str | Path) -> str:
    """The embedded default: `<data_dir>/tokenmill.db`."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / 'tokenmill.db'}"


@dataclass(frozen=True, slots=True)
class Database:
    """An engine plus session factories. `write()` is the only way to change rows: on SQLite it holds the
    database write lock for the whole transaction, so a read-check-write inside it cannot race."""

    url: URL
    engine: Engine
    clock: Callable[[], datetime] = utcnow
    """Returns an aware UTC datetime; tests inject a fixed one to move expiry without sleeping."""
    _read_sessions: sessionmaker[Session] = field(init=False, repr=False)
    _write_sessions: sessionmaker[Session] = field(init=False, repr=False)
    _writer_lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        object.__setattr__(self, "_read_sessions", sessionmaker(self.engine, expire_on_commit=False))
        object.__setattr__(self, "_write_sessions", sessionmaker(write_engine, expire_on_commit=False))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def now(self) -> datetime:
        return self.clock()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session; whatever it did is rolled back on exit."""
        with self._read_sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: commit on normal exit, rollback on exception.

        SQLite: an in-process lock plus BEGIN IMMEDIATE (other processes wait on the busy timeout), so
        writers are serialized. PostgreSQL: READ COMMITTED; callers that read-then-write money lock the
        organization row first (`lock_organization`)."""
        lock: AbstractContextManager[Any] = self._writer_lock if self.is_sqlite else nullcontext()
        with lock, self._write_sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def open_database(
    url: str,
    *,
    clock: Callable[[], datetime] = utcnow,
    pool_size: int = 10,
    max_overflow: int = 20,
) -> Database:
    """Build the engine for `url` (sqlite:///path or postgresql[+psycopg]://...). Does not migrate:
    call `tokenmill.platform.migrate.upgrade` once at startup."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(
            parsed,
            isolation_level="READ COMMITTED",
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
    else:
        raise InvalidArgument(
            f"database_url: unsupported backend {parsed.get_backend_name()!r} "
            "(use sqlite:///path or postgresql://...)"
        )
    return Database(url=parsed, engine=engine, clock=clock)


def _sqlite_engine(url: URL) -> Engine:
    if not url.database or url.database == ":memory:":
        raise InvalidArgument(
            "database_url: SQLite needs a file path (sqlite:///path/tokenmill.db); an "
            "in-memory database is not shared between connections"
        )
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN IMMEDIATE is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Readers take no lock (WAL); writers take the write lock before their first read, so the
        # balance they check cannot change before they commit.
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
