"""The schema comes from the packaged Alembic migrations alone, identically on SQLite and PostgreSQL; an
existing database upgrades with its data kept working."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import bindparam, inspect, text

from tests.platform.conftest import EmptyDatabase
from tokenmill.platform.accounts import set_organization_tier
from tokenmill.platform.auth import authenticate
from tokenmill.platform.db import Database, open_database, sqlite_url
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.keys import generate_key, hash_key, list_keys, revoke_key, visible_prefix
from tokenmill.platform.migrate import MIGRATIONS_DIR, current_revision, head_revision, upgrade
from tokenmill.platform.ratelimit import RateLimits
from tokenmill.platform.tables import Base, UTCDateTime, new_id
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
    "invites",
    "login_failures",
    "files",
    "data_controls",
    "fine_tuning_jobs",
    "fine_tuning_events",
    "fine_tuning_checkpoints",
    "adapter_models",
    "batches",
    "batch_lines",
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
            keys[org_id] = _old_account(db, org_id, tier, max_concurrent=3 if tier == "pro" else None)

        upgrade(db)
        tiers = {info.limits.name: info for info in list_tiers(db)}
        assert {name: info.num_organizations for name, info in tiers.items()} == {
            "default": 1,
            "pro": 1,
            "gold": 2,
            "unlimited": 0,
            "free": 0,
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


def test_upgrading_to_people_keeps_every_key_an_api_key_and_key_changes_still_counted(
    empty_database: EmptyDatabase,
) -> None:
    upgrade(empty_database.url, "0004")  # before session keys
    db = open_database(empty_database.url)
    try:
        org_id = new_id("org")
        key = _old_account(db, org_id, "default", max_concurrent=None)
        upgrade(db)
        principal = authenticate(db, key)
        assert [info.id for info in list_keys(db, org_id)] == [principal.key_id]

        def revision() -> int:
            with db.read() as session:
                return session.execute(text("SELECT value FROM access_revision")).scalar_one()

        before = revision()
        revoke_key(db, principal.key_id)  # the triggers of 0004 survived the new column
        assert revision() > before
    finally:
        db.close()


def _old_account(db: Database, org_id: str, tier: str, *, max_concurrent: int | None) -> str:
    """An organization, a user and a key written as release 0001 wrote them (the models of today have
    columns that schema lacks); returns the key."""
    raw, now, user_id = generate_key(), db.now(), new_id("user")
    stamp = bindparam("created_at", type_=UTCDateTime())  # written as the platform writes datetimes
    with db.write() as session:
        session.execute(
            text("INSERT INTO organizations VALUES (:id, :id, :tier, :created_at)").bindparams(stamp),
            {"id": org_id, "tier": tier, "created_at": now},
        )
        session.execute(
            text(
                "INSERT INTO users (id, org_id, email, name, created_at) VALUES (:id, :org, :email, :email, "
                ":created_at)"
            ).bindparams(stamp),
            {"id": user_id, "org": org_id, "email": f"{org_id}@example.com", "created_at": now},
        )
        session.execute(
            text(
                "INSERT INTO api_keys (id, org_id, user_id, name, prefix, key_hash, max_concurrent_requests, "
                "created_at) VALUES (:id, :org, :user, '', :prefix, :hash, :concurrent, :created_at)"
            ).bindparams(stamp),
            {
                "id": new_id("key"),
                "org": org_id,
                "user": user_id,
                "prefix": visible_prefix(raw),
                "hash": hash_key(raw),
                "concurrent": max_concurrent,
                "created_at": now,
            },
        )
    return raw


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
