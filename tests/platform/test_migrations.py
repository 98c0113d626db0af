"""The schema comes from the packaged Alembic migrations alone, identically on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from tests.platform.conftest import EmptyDatabase
from tokenmill.platform.db import open_database, sqlite_url
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from tokenmill.platform.tables import Base

TABLES = {
    "organizations",
    "users",
    "api_keys",
    "admin_keys",
    "model_prices",
    "ledger_entries",
    "reservations",
    "usage_records",
}


def test_upgrade_creates_the_schema_from_empty_and_is_idempotent(empty_database: EmptyDatabase) -> None:
    db = open_database(empty_database.url)
    try:
        assert set(inspect(db.engine).get_table_names()) == set()
        assert current_revision(db) is None

        upgrade(empty_database.url)
        assert set(inspect(db.engine).get_table_names()) == TABLES | {"alembic_version"}
        assert current_revision(db) == head_revision() is not None

        upgrade(db)  # a second start: nothing to do, nothing breaks
        assert current_revision(db) == head_revision()

        # The migrations and the typed models describe the same schema (columns, types, indexes).
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        db.close()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    db = open_database(sqlite_url(tmp_path))
    try:
        with db.read() as session:
            assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert (session.execute(text("PRAGMA busy_timeout")).scalar() or 0) >= 1000
            assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.close()


def test_unusable_database_urls_are_refused_with_the_field_named() -> None:
    with pytest.raises(InvalidArgument, match="database_url"):
        open_database("sqlite://")
    with pytest.raises(InvalidArgument, match="database_url"):
        open_database("mysql://localhost/db")


def test_migrations_ship_inside_the_package() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert any(p.name.startswith("0001_") for p in (MIGRATIONS_DIR / "versions").glob("*.py"))
