"""A gateway remembers who a key is and which listing its caller gets until the access revision moves. The
revision moves, by trigger, with every change to keys, organizations, tiers, listings or prices, made
through any connection, and never with billing. So a remembered answer is never stale: a change made by
another process (the admin CLI here, through a database handle of its own) holds from the next request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select

from tests.platform.conftest import EmptyDatabase
from tests.platform.helpers import make_account, priced_model, reserve_model, unique
from tokenmill.platform.accounts import set_organization_tier
from tokenmill.platform.billing import settle
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.errors import ExpiredKey, ModelNotFound, RevokedKey
from tokenmill.platform.gateway import Gateway, PlatformSettings
from tokenmill.platform.keys import create_key, revoke_key
from tokenmill.platform.ledger import top_up
from tokenmill.platform.listing_terms import ListingChanges, ListingSpec
from tokenmill.platform.listings import apply_listing, set_listing_status, update_listing, update_own_listing
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.pricing import Price, set_model_price
from tokenmill.platform.ratelimit_memory import InMemoryRateLimiter
from tokenmill.platform.tables import AccessRevision
from tokenmill.platform.tiers import set_tier_limits


def _revision(db: Database) -> int:
    with db.read() as session:
        return session.scalars(select(AccessRevision.value)).one()


def test_the_revision_moves_with_every_access_change_and_never_with_billing(db: Database) -> None:
    account = make_account(db, 10_000_000)
    model = priced_model(db, 1_000_000, 2_000_000)
    before = _revision(db)
    reservation = reserve_model(db, account.principal, model, 10, 10)
    settle(db, reservation, 10, 5, "ok", 0.1)
    top_up(db, account.org.id, 5_000_000, idempotency_key=unique("top-up"))
    assert _revision(db) == before  # a request's reservation, charge and a top-up change no one's access

    tier = unique("tier")
    changes: list[Callable[[], object]] = [
        lambda: create_key(db, account.user.id),
        lambda: revoke_key(db, account.key.info.id),
        lambda: set_tier_limits(db, tier, {"requests_per_minute": 5}),
        lambda: set_organization_tier(db, account.org.id, tier),
        lambda: set_model_price(db, model, 3, 4),
        lambda: update_listing(db, model, ListingChanges(description="changed")),
        lambda: set_listing_status(db, model, "retired"),
    ]
    for change in changes:
        revision = _revision(db)
        change()
        assert _revision(db) > revision


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def gateway_and_admin(
    empty_database: EmptyDatabase, tmp_path: Path
) -> Iterator[tuple[Gateway, Database, _Clock, list[str]]]:
    """A gateway, the admin's own handle on the same database, the gateway's clock, and the statements
    the gateway sends to the database."""
    upgrade(empty_database.url)
    clock = _Clock()
    db = open_database(empty_database.url, clock=clock)
    admin = open_database(empty_database.url, clock=clock)
    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    settings = PlatformSettings(data_dir=tmp_path, database_url=empty_database.url)
    gateway = Gateway(settings, db, InMemoryRateLimiter())
    try:
        yield gateway, admin, clock, statements
    finally:
        gateway.close()
        admin.close()


def test_a_remembered_key_or_listing_is_never_stale(
    gateway_and_admin: tuple[Gateway, Database, _Clock, list[str]], empty_database: EmptyDatabase
) -> None:
    gateway, admin, clock, statements = gateway_and_admin
    account = make_account(admin, expires_at=clock.now + timedelta(hours=1))
    model = priced_model(admin, 1_000_000, 2_000_000)
    principal = gateway.authenticate(account.key.key)
    listing = gateway.resolve(principal, model)
    num_statements = len(statements)
    for _ in range(3):
        assert gateway.authenticate(account.key.key) == principal
        assert gateway.resolve(principal, model) == listing
    if empty_database.backend == "sqlite":  # answered from memory: not one statement
        assert len(statements) == num_statements
        assert gateway.remembered_principal(account.key.key) == principal
        assert gateway.remembered_listing(principal, model) == listing
    else:  # nothing remembered: each request reads, as before
        assert len(statements) > num_statements
        assert gateway.remembered_principal(account.key.key) is None

    set_model_price(admin, model, 5, 7)
    assert gateway.resolve(principal, model).price == Price(5, 7)
    clock.now += timedelta(hours=1)  # expiry is a moment, no commit: a remembered key expires too
    with pytest.raises(ExpiredKey):
        gateway.authenticate(account.key.key)
    clock.now -= timedelta(hours=1)
    revoke_key(admin, account.key.info.id)
    with pytest.raises(RevokedKey):
        gateway.authenticate(account.key.key)
    set_listing_status(admin, model, "retired")
    with pytest.raises(ModelNotFound):
        gateway.resolve(make_account(admin).principal, model)


def test_a_providers_publish_rename_and_retire_hold_from_the_next_request(
    gateway_and_admin: tuple[Gateway, Database, _Clock, list[str]],
) -> None:
    """The provider edits through another gateway (here the admin's handle): this gateway's remembered
    answers follow at once, because every provider change is a write to `listings`."""
    gateway, admin, _, _ = gateway_and_admin
    provider, buyer = make_account(admin), make_account(admin)
    model = apply_listing(admin, ListingSpec(unique("m"), provider=provider.org.id, status="draft")).model
    principal = gateway.authenticate(buyer.key.key)
    with pytest.raises(ModelNotFound):
        gateway.resolve(principal, model)
    update_own_listing(admin, provider.org.id, model, ListingChanges(status="published"))
    assert gateway.resolve(principal, model).display_name == model
    update_own_listing(admin, provider.org.id, model, ListingChanges(display_name="Renamed", tags=("new",)))
    renamed = gateway.resolve(principal, model)
    assert (renamed.display_name, renamed.tags) == ("Renamed", ("new",))
    update_own_listing(admin, provider.org.id, model, ListingChanges(status="retired"))
    with pytest.raises(ModelNotFound):
        gateway.resolve(principal, model)
