"""The schema comes from the packaged Alembic migrations alone, identically on SQLite and PostgreSQL; an
existing database upgrades with its data kept working."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from tests.platform.conftest import EmptyDatabase
from tokenmill.platform.accounts import create_user, set_organization_tier
from tokenmill.platform.auth import authenticate
from tokenmill.platform.db import open_database, sqlite_url
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.keys import create_key
from tokenmill.platform.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from tokenmill.platform.ratelimit import RateLimits
from tokenmill.platform.tables import Base, Organization, new_id
from tokenmill.platform.tiers import effective_limits, list_tiers

TABLES = {
    "organizations",
    "users",
    "api_keys",
    "admin_keys",
    "model_prices",
    "ledger_entries",
    "reservations",
    "usage_records",
    "rate_limit_tiers",
    "listings",
    "audit_log",
    "access_revision",
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


def test_upgrading_gives_every_tier_in_use_its_row_and_keeps_its_keys_working(
    empty_database: EmptyDatabase,
) -> None:
    upgrade(empty_database.url, "0001")  # a database from before tiers were rows
    db = open_database(empty_database.url)
    try:
        keys: dict[str, str] = {}
        # "gold": a name the operator made up, which had no limits of its own (it got default's).
        for tier in ("default", "pro", "gold", "gold"):
            org_id = new_id("org")
            with db.write() as session:
                session.add(Organization(id=org_id, name=org_id, tier=tier, created_at=db.now()))
            user = create_user(db, org_id, f"{org_id}@example.com")
            keys[org_id] = create_key(db, user.id, max_concurrent_requests=3 if tier == "pro" else None).key

        upgrade(db)
        tiers = {info.limits.name: info for info in list_tiers(db)}
        assert {name: info.num_organizations for name, info in tiers.items()} == {
            "default": 1,
            "pro": 1,
            "gold": 2,
            "unlimited": 0,
        }
        default, pro = tiers["default"].limits, tiers["pro"].limits
        assert (default.paid, default.free) == (RateLimits(600, 1_000_000, 32), RateLimits(120, 200_000, 16))
        assert (pro.paid, pro.free) == (RateLimits(6_000, 10_000_000, 256), RateLimits(1_200, 2_000_000, 64))
        assert (tiers["gold"].limits.paid, tiers["gold"].limits.free) == (default.paid, default.free)
        assert (tiers["unlimited"].limits.paid, tiers["unlimited"].limits.free) == (
            RateLimits(),
            RateLimits(),
        )

        for org_id, key in keys.items():  # every key authenticates with its tier's limits joined in
            principal = authenticate(db, key)
            tier = tiers[principal.tier].limits
            assert principal.org_id == org_id and principal.tier_limits == tier
            free = effective_limits(db, principal).free.limits
            concurrency = 3 if principal.tier == "pro" else tier.free.max_concurrent_requests
            assert (free.tokens_per_minute, free.max_concurrent_requests) == (
                tier.free.tokens_per_minute,
                concurrency,
            )
        assert set_organization_tier(db, next(iter(keys)), "gold").tier == "gold"
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
    names = {p.name[:5] for p in (MIGRATIONS_DIR / "versions").glob("*.py")}
    assert {"0001_", "0002_"} <= names
