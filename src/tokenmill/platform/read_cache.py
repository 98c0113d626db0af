"""The answers of the reads every request repeats (who a key is, which listing its caller gets), remembered
until the database's access revision moves. That number is bumped by trigger in every transaction that
changes keys, organizations, tiers, listings or prices (migration 0004), whoever commits it: this process,
the admin CLI, another gateway or a hand edit. So an entry is never stale, and billing's commits, which
touch none of those tables, forget nothing: a burst of requests authenticates without a query, and an
overloaded model's refusals cost microseconds, not database reads.

Remembers only on SQLite, where the revision is read in microseconds through a connection of its own; on
PostgreSQL reading it would be a round trip like the reads it saves, so every lookup misses and each
request reads, as before."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Hashable

from tokenmill.platform.db import Database

MAX_ENTRIES = 10_000
"""Past this many, everything is forgotten: a flood of distinct keys costs reads, never memory."""


class ReadCache:
    def __init__(self, db: Database) -> None:
        self._revisions = _SqliteRevision(str(db.url.database)) if db.is_sqlite else None
        self._lock = threading.Lock()
        self._revision: int | None = None
        self._entries: dict[Hashable, object] = {}

    def revision(self) -> int | None:
        """Take before the read whose answer you will `put`: a change in between then makes it miss."""
        if self._revisions is None:
            return None
        revision = self._revisions.read()
        with self._lock:
            if revision != self._revision:
                self._entries.clear()
                self._revision = revision
        return revision

    def get(self, key: Hashable) -> object | None:
        """What was `put` under `key` if the revision has not moved since its read; else None."""
        revision = self.revision()
        if revision is None:
            return None
        with self._lock:
            return self._entries.get(key) if revision == self._revision else None

    def put(self, key: Hashable, value: object, revision: int | None) -> None:
        """`revision` is what `revision()` returned before `value` was read."""
        if revision is None:
            return
        with self._lock:
            if revision != self._revision:  # it moved meanwhile: the value may be older than the change
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = value

    def close(self) -> None:
        if self._revisions is not None:
            self._revisions.close()


class _SqliteRevision:
    """`access_revision.value` through a connection of its own that never writes. `PRAGMA data_version`
    (which changes only when another connection has committed) spares the SELECT while nothing did."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._revision = 0

    def read(self) -> int:
        with self._lock:
            if self._connection is None:
                self._connection = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            (data_version,) = self._connection.execute("PRAGMA data_version").fetchone()
            if data_version != self._data_version:
                (self._revision,) = self._connection.execute(
                    "SELECT value FROM access_revision WHERE id = 1"
                ).fetchone()
                self._data_version = data_version
            return self._revision

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
