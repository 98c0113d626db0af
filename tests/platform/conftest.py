"""Real backends for the platform tests: every database test runs on a SQLite file and on a private
PostgreSQL schema; rate-limit tests on the in-process backend and on Redis. Unreachable servers skip
their half of the suite with the reason in the report (-ra)."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tokenmill.platform.db import Database, open_database
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.ratelimit import RateLimiter
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.ratelimit_redis import RedisRateLimiter

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
LIMITERS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@functools.cache
def postgres_unavailable() -> str | None:
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {POSTGRES_DSN} ({exc}); PostgreSQL tests skipped"
    return None


@functools.cache
def redis_unavailable() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis not reachable at {REDIS_URL} ({exc}); Redis tests skipped"
    return None


class EmptyDatabase:
    """A URL to a database with no tables yet, and its cleanup."""

    def __init__(self, backend: str, tmp_dir: Path) -> None:
        self.backend = backend
        self._schema: str | None = None
        if backend == "sqlite":
            self.url = f"sqlite:///{tmp_dir / 'tokenmill.db'}"
            return
        reason = postgres_unavailable()
        if reason:
            pytest.skip(reason)
        self._schema = f"tm_test_{secrets.token_hex(6)}"
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self._schema}")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{self._schema}"

    def drop(self) -> None:
        if self._schema is not None:
            with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {self._schema} CASCADE")


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmptyDatabase]:
    empty = EmptyDatabase(request.param, tmp_path)
    yield empty
    empty.drop()


@pytest.fixture(scope="module", params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """One migrated database per test module and backend; tests isolate themselves by creating their own
    organizations and models (unique names), so they need no cleanup between them."""
    empty = EmptyDatabase(request.param, tmp_path_factory.mktemp("platform-db"))
    upgrade(empty.url)
    database = open_database(empty.url)
    yield database
    database.close()
    empty.drop()


def _redis_limiters() -> Iterator[Callable[..., RateLimiter]]:
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"tokenmill-test:{secrets.token_hex(6)}"
    clients: list[redis.Redis] = []

    def make(**kwargs: object) -> RateLimiter:
        client = redis.Redis.from_url(REDIS_URL)
        clients.append(client)
        return RedisRateLimiter(client, prefix=prefix, **kwargs)  # type: ignore[arg-type]

    yield make
    cleaner = redis.Redis.from_url(REDIS_URL)
    keys = list(cleaner.scan_iter(f"{prefix}:*"))
    if keys:
        cleaner.delete(*keys)
    for client in [*clients, cleaner]:
        client.close()


@pytest.fixture(params=LIMITERS)
def limiter_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., RateLimiter]]:
    """`make(clock=..., **kwargs)` -> a fresh limiter of the backend under test."""
    if request.param == "memory":
        yield lambda **kwargs: InMemoryRateLimiter(**kwargs)
    else:
        yield from _redis_limiters()


@pytest.fixture
def redis_limiter_factory() -> Iterator[Callable[..., RateLimiter]]:
    """Every call builds a new Redis client on one shared key prefix, as separate gateway processes would."""
    yield from _redis_limiters()
