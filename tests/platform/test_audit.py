"""Every operator change made through `admin_ops` is one audit row naming who did what to which target, with
its state before and after; refused calls and calls that change nothing write none; no secret ever reaches
the log; and the log reads back newest first, page by page, filtered by action or target."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.platform.helpers import make_account, priced_model, unique
from tokenmill.platform import admin_ops
from tokenmill.platform.accounts import get_organization
from tokenmill.platform.audit import AuditInfo, list_audit, record, snapshot
from tokenmill.platform.auth import authenticate, authenticate_admin
from tokenmill.platform.billing import reserve
from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument, NotFound, PlatformError
from tokenmill.platform.keys import get_key, hash_key
from tokenmill.platform.ledger import balance_micros
from tokenmill.platform.listing_terms import ListingChanges, ListingSpec
from tokenmill.platform.listings import apply_listing, get_listing
from tokenmill.platform.pricing import Price
from tokenmill.platform.tables import AdminKey
from tokenmill.platform.tiers import get_tier

ACTOR = "adm_test"


class Trail:
    """The rows written since the last look: each test sees only what its own calls wrote."""

    def __init__(self, db: Database) -> None:
        self.db = db
        newest = list_audit(db, limit=1)
        self.last_id = newest[0].id if newest else 0

    def new(self) -> list[AuditInfo]:
        rows = [row for row in list_audit(self.db, limit=1000) if row.id > self.last_id]
        if rows:
            self.last_id = rows[0].id
        return rows[::-1]

    def one(self, action: str, target: str) -> AuditInfo:
        rows = self.new()
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row.actor, row.action, row.target) == (ACTOR, action, target)
        return row


@pytest.fixture
def trail(db: Database) -> Trail:
    return Trail(db)


def test_organizations_and_users(db: Database, trail: Trail) -> None:
    org = admin_ops.create_org(db, ACTOR, unique("acme"))
    row = trail.one("create_org", org.id)
    assert row.before is None and row.after == snapshot(org)
    assert row.after["name"] == org.name and row.after["created_at"] == org.created_at.isoformat()

    moved = admin_ops.set_org_tier(db, ACTOR, org.name, "pro")
    row = trail.one("set_org_tier", org.id)
    assert (row.before["tier"], row.after["tier"]) == ("default", "pro") and row.after == snapshot(moved)

    user = admin_ops.create_user(db, ACTOR, org.name, f"{unique('u')}@example.com", name="Ann")
    row = trail.one("create_user", user.id)
    assert row.before is None and row.after == snapshot(user) and row.after["org_id"] == org.id


def test_keys(db: Database, trail: Trail) -> None:
    account = make_account(db)
    trail.new()
    expires_at = datetime.now(UTC) + timedelta(days=3)
    created = admin_ops.create_key(
        db,
        ACTOR,
        account.user.email,
        name="ci",
        allowed_models=["b", "a"],
        spend_limit_micros=5_000_000,
        expires_at=expires_at,
        requests_per_minute=7,
        tokens_per_minute=700,
        max_concurrent_requests=2,
    )
    row = trail.one("create_key", created.info.id)
    assert row.before is None and row.after == snapshot(created.info)
    assert row.after["prefix"] == created.info.prefix and row.after["allowed_models"] == ["a", "b"]
    assert row.after["spend_limit_micros"] == 5_000_000 and row.after["requests_per_minute"] == 7
    assert authenticate(db, created.key).key_id == created.info.id

    revoked = admin_ops.revoke_key(db, ACTOR, created.info.id)
    row = trail.one("revoke_key", created.info.id)
    assert row.before["revoked_at"] is None and row.after["revoked_at"] == revoked.revoked_at.isoformat()
    assert row.before == snapshot(created.info)


def test_top_up_and_its_replay(db: Database, trail: Trail) -> None:
    account = make_account(db, 1_000_000)
    trail.new()
    paid = admin_ops.top_up(
        db, ACTOR, account.org.name, 2_500_000, idempotency_key=unique("pay"), note="wire"
    )
    row = trail.one("top_up", account.org.id)
    assert row.before == {"balance_micros": 1_000_000}
    assert row.after["balance_micros"] == 3_500_000 == balance_micros(db, account.org.id)
    assert row.after["entry"] == snapshot(paid.entry) and row.after["entry"]["note"] == "wire"

    replay = admin_ops.top_up(
        db, ACTOR, account.org.id, 2_500_000, idempotency_key=paid.entry.idempotency_key, note="wire"
    )
    assert not replay.created and trail.new() == [] and balance_micros(db, account.org.id) == 3_500_000


def test_prices_and_tiers(db: Database, trail: Trail) -> None:
    model = unique("model")
    admin_ops.set_price(db, ACTOR, model, 100, 200)
    row = trail.one("set_price", model)
    assert row.before is None
    assert row.after == {"input_micros_per_mtok": 100, "output_micros_per_mtok": 200}
    admin_ops.set_price(db, ACTOR, model, 0, 0)
    row = trail.one("set_price", model)
    assert row.before == {"input_micros_per_mtok": 100, "output_micros_per_mtok": 200}
    assert row.after == {"input_micros_per_mtok": 0, "output_micros_per_mtok": 0}

    tier = unique("gold")
    created = admin_ops.set_tier_limits(db, ACTOR, tier, {"requests_per_minute": 5}, copy_from="pro")
    row = trail.one("set_tier_limits", tier)
    assert row.before is None and row.after == snapshot(created)
    assert (
        row.after["paid"]["requests_per_minute"] == 5 and row.after["paid"]["tokens_per_minute"] == 10_000_000
    )
    admin_ops.set_tier_limits(db, ACTOR, tier, {"free_tokens_per_minute": None})
    row = trail.one("set_tier_limits", tier)
    assert row.before == snapshot(created) and row.after == snapshot(get_tier(db, tier))
    assert (
        row.before["free"]["tokens_per_minute"] == 2_000_000
        and row.after["free"]["tokens_per_minute"] is None
    )


def test_listings(db: Database, trail: Trail) -> None:
    provider = make_account(db).org
    buyer = make_account(db).org
    model = unique("model")
    spec = ListingSpec(model, provider=provider.name, tags=("b", "a"), price=Price(10, 20), status="draft")
    created = admin_ops.apply_listing(db, ACTOR, spec)
    row = trail.one("apply_listing", model)
    assert row.before is None and row.after == snapshot(created)
    assert row.after["provider_org_id"] == provider.id and row.after["status"] == "draft"
    assert row.after["price"] == {"input_micros_per_mtok": 10, "output_micros_per_mtok": 20}

    replaced = admin_ops.apply_listing(db, ACTOR, ListingSpec(model, provider=provider.id, license="MIT"))
    row = trail.one("apply_listing", model)
    assert row.before == snapshot(created) and row.after == snapshot(replaced)
    assert (row.before["license"], row.after["license"]) == ("", "MIT") and row.after["tags"] == []

    changes = ListingChanges(price=Price(0, 0), visibility="shared", shared_with=(buyer.name,))
    updated = admin_ops.update_listing(db, ACTOR, model, changes)
    row = trail.one("update_listing", model)
    assert row.before == snapshot(replaced) and row.after == snapshot(updated)
    assert row.after["shared_with"] == [buyer.id] and row.after["price"]["input_micros_per_mtok"] == 0

    for status in ("published", "retired"):
        admin_ops.set_listing_status(db, ACTOR, model, status)
        row = trail.one("set_listing_status", model)
        assert row.after == snapshot(get_listing(db, model)) and row.after["status"] == status
    assert row.before["status"] == "published"


def test_release_reservations(db: Database, trail: Trail) -> None:
    account = make_account(db, 1_000_000)
    listing = apply_listing(db, ListingSpec(unique("model"), price=Price(1_000, 1_000)))
    gone = unique("gw")
    held = [reserve(db, account.principal, listing, 10, 10, owner=gone, fee_bps=0).id for _ in range(2)]
    trail.new()
    assert sorted(admin_ops.release_reservations(db, ACTOR, gateway_id=gone)) == sorted(held)
    row = trail.one("release_reservations", gone)
    assert row.before["state"] == "open" and row.after["state"] == "released"
    assert sorted(row.after["reservation_ids"]) == sorted(held) and row.after["gateway_id"] == gone

    assert admin_ops.release_reservations(db, ACTOR, gateway_id=gone) == []  # nothing left: no row
    assert trail.new() == []


def test_rotate_admin_key_records_key_ids(db: Database, trail: Trail, tmp_path: Path) -> None:
    first = admin_ops.rotate_admin_key(db, ACTOR, tmp_path)
    trail.new()
    second = admin_ops.rotate_admin_key(db, ACTOR, tmp_path)
    row = trail.one("rotate_admin_key", "admin_key")
    assert row.before == {"active_key_ids": [_admin_key_id(db, first)]}
    assert row.after == {"active_key_ids": [authenticate_admin(db, second).key_id]}
    assert _admin_key_id(db, first) != _admin_key_id(db, second)


def _admin_key_id(db: Database, raw: str) -> str:
    with db.read() as session:
        return session.scalars(select(AdminKey.id).where(AdminKey.key_hash == hash_key(raw))).one()


REFUSED: list[tuple[str, Callable[[Database, str, str], object]]] = [
    ("duplicate org", lambda db, org, _: admin_ops.create_org(db, ACTOR, org)),
    ("unknown tier", lambda db, _, __: admin_ops.create_org(db, ACTOR, unique("o"), tier="no-such-tier")),
    ("org to unknown tier", lambda db, org, _: admin_ops.set_org_tier(db, ACTOR, org, "no-such-tier")),
    ("unknown org's tier", lambda db, _, __: admin_ops.set_org_tier(db, ACTOR, "no-such-org", "pro")),
    ("bad email", lambda db, org, _: admin_ops.create_user(db, ACTOR, org, "not-an-email")),
    ("user of no org", lambda db, _, __: admin_ops.create_user(db, ACTOR, "no-such-org", "x@example.com")),
    ("key of no user", lambda db, _, __: admin_ops.create_key(db, ACTOR, "nobody@example.com")),
    ("key limit", lambda db, _, email: admin_ops.create_key(db, ACTOR, email, requests_per_minute=0)),
    ("unknown key", lambda db, _, __: admin_ops.revoke_key(db, ACTOR, "key_0000")),
    ("zero top-up", lambda db, org, _: admin_ops.top_up(db, ACTOR, org, 0, idempotency_key=unique("k"))),
    (
        "top-up no org",
        lambda db, _, __: admin_ops.top_up(db, ACTOR, "no-org", 1, idempotency_key=unique("k")),
    ),
    ("negative price", lambda db, _, __: admin_ops.set_price(db, ACTOR, unique("m"), -1, 0)),
    ("unknown limit", lambda db, _, __: admin_ops.set_tier_limits(db, ACTOR, "pro", {"rpm": 5})),
    (
        "copy no tier",
        lambda db, _, __: admin_ops.set_tier_limits(db, ACTOR, unique("t"), {}, copy_from="nope"),
    ),
    ("unknown listing", lambda db, _, __: admin_ops.set_listing_status(db, ACTOR, unique("m"), "retired")),
    ("listing status", lambda db, _, __: admin_ops.set_listing_status(db, ACTOR, _listed(db), "gone")),
    (
        "update no listing",
        lambda db, _, __: admin_ops.update_listing(db, ACTOR, unique("m"), ListingChanges()),
    ),
    (
        "listing provider",
        lambda db, _, __: admin_ops.apply_listing(db, ACTOR, ListingSpec("m", provider="no-org")),
    ),
    (
        "shared with none",
        lambda db, _, __: admin_ops.apply_listing(db, ACTOR, ListingSpec("m", visibility="shared")),
    ),
    ("release what", lambda db, _, __: admin_ops.release_reservations(db, ACTOR)),
    ("release age", lambda db, _, __: admin_ops.release_reservations(db, ACTOR, older_than=timedelta(0))),
    ("empty actor", lambda db, _, __: admin_ops.create_org(db, " ", unique("o"))),
    ("invalid actor", lambda db, _, __: admin_ops.set_price(db, "\ud800", unique("m"), 1, 1)),
]


def _listed(db: Database) -> str:
    """A published listing, made without admin_ops so it writes no row of its own."""
    return apply_listing(db, ListingSpec(unique("model"))).model


@pytest.mark.parametrize("call", [call for _, call in REFUSED], ids=[name for name, _ in REFUSED])
def test_a_refused_action_writes_no_row(
    db: Database, trail: Trail, call: Callable[[Database, str, str], object]
) -> None:
    account = make_account(db, 1_000)
    trail.new()
    with pytest.raises(PlatformError):
        call(db, account.org.name, account.user.email)
    assert trail.new() == []
    assert (
        balance_micros(db, account.org.id) == 1_000 and get_organization(db, account.org.id).tier == "default"
    )


def test_a_bad_actor_is_refused_before_the_change(db: Database) -> None:
    name = unique("never")
    with pytest.raises(InvalidArgument, match="actor"):
        admin_ops.create_org(db, "", name)
    with pytest.raises(NotFound):
        get_organization(db, name)


def test_changing_nothing_writes_no_row(db: Database, trail: Trail) -> None:
    account = make_account(db)
    model = priced_model(db, 5, 5)
    trail.new()
    admin_ops.revoke_key(db, ACTOR, account.key.info.id)
    assert len(trail.new()) == 1
    again = admin_ops.revoke_key(db, ACTOR, account.key.info.id)
    assert again == get_key(db, account.key.info.id) and trail.new() == []
    admin_ops.set_price(db, ACTOR, model, 5, 5)
    admin_ops.set_org_tier(db, ACTOR, account.org.id, "default")
    admin_ops.set_tier_limits(db, ACTOR, "pro", {})
    assert trail.new() == []


def test_no_secret_ever_reaches_the_log(db: Database, tmp_path: Path) -> None:
    account = make_account(db)
    created = admin_ops.create_key(db, ACTOR, account.user.id, name="secret-test")
    admin_ops.revoke_key(db, ACTOR, created.info.id)
    admin_key = admin_ops.rotate_admin_key(db, ACTOR, tmp_path)
    record(db, ACTOR, "test", unique("t"), None, created)  # even a CreatedKey handed over by mistake
    rows = list_audit(db, limit=1000)
    text = json.dumps([[r.actor, r.action, r.target, r.before, r.after] for r in rows])
    assert created.info.id in text and created.info.prefix in text
    for raw, shown in ((created.key, created.info.prefix), (admin_key, "sk-admin-")):
        assert raw not in text and raw[len(shown) :] not in text
    assert snapshot(created) == snapshot(created.info)


def test_snapshot_makes_plain_sorted_json() -> None:
    moment = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    value = {"when": moment, "models": frozenset({"b", "a"}), "price": Price(1, 2), "list": [3, 1], "n": None}
    assert snapshot(value) == {
        "when": "2025-03-01T12:00:00+00:00",
        "models": ["a", "b"],
        "price": {"input_micros_per_mtok": 1, "output_micros_per_mtok": 2},
        "list": [3, 1],
        "n": None,
    }
    assert snapshot(("x", 1)) in (["x", 1], [1, "x"])  # a mix sorts without failing
    with pytest.raises(TypeError):
        snapshot(object())
    with pytest.raises(TypeError):
        snapshot(float("nan"))


def test_list_audit_pages_and_filters(db: Database) -> None:
    target, action = unique("target"), unique("action")
    written = [
        record(db, "paging", action if i % 2 else "other", target, {"i": i}, {"i": i + 1}) for i in range(5)
    ]
    newest_first = [row.id for row in reversed(written)]
    page = list_audit(db, limit=2, target=target)
    assert [row.id for row in page] == newest_first[:2]
    page = list_audit(db, limit=2, target=target, before_id=page[-1].id)
    assert [row.id for row in page] == newest_first[2:4]
    assert [row.id for row in list_audit(db, target=target, before_id=page[-1].id)] == newest_first[4:]
    assert [row.after for row in list_audit(db, action=action)] == [{"i": 4}, {"i": 2}]
    assert list_audit(db, action=action, target=unique("none")) == []
    assert written[0] == list_audit(db, target=target)[-1]
    assert written[0].created_at.tzinfo is not None and written[0].actor == "paging"
    for bad in ({"limit": 0}, {"limit": 1001}, {"before_id": 0}, {"action": ""}, {"target": "\x00"}):
        with pytest.raises(InvalidArgument):
            list_audit(db, **bad)  # type: ignore[arg-type]
