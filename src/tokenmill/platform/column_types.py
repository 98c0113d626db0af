"""The column types and helpers the platform's tables are built from, apart from the tables themselves:
aware UTC datetimes and valid-text lists on both backends, auto-increment ids, opaque public ids."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Integer, TypeDecorator

from tokenmill.text import invalid_text_reason, printable

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def new_id(prefix: str) -> str:
    """Opaque public ids (`org_…`, `key_…`): they reveal neither counts nor order."""
    return f"{prefix}_{secrets.token_hex(8)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends (SQLite stores them naive; we re-attach UTC on the way out)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the platform stores aware UTC datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class TextList(TypeDecorator[list[str]]):
    """A JSON list of strings. JSON escapes a lone surrogate, so unlike a String column it could store text
    that no response can carry: writing one is refused, and one stored before that rule is read back with
    U+FFFD in its place, so a single bad row cannot break every read of its table."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> list[str] | None:
        if value is not None and any(invalid_text_reason(item) for item in value):
            raise ValueError("TextList: refusing to store invalid Unicode text")
        return value

    def process_result_value(self, value: list[str] | None, dialect: Dialect) -> list[str] | None:
        return None if value is None else [printable(item) for item in value]


def one_of(column: str, values: tuple[str, ...]) -> str:
    """A CHECK that `column` holds one of `values`."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"
