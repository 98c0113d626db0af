"""Factories shared by the platform tests: accounts with money, listed and priced models, reservations
through the listing a caller resolves, a clock tests can move."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tokenmill.platform.accounts import OrgInfo, UserInfo, create_organization, create_user
from tokenmill.platform.auth import authenticate
from tokenmill.platform.billing import DEFAULT_OWNER, Reservation, reserve
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.keys import CreatedKey, create_key
from tokenmill.platform.ledger import top_up
from tokenmill.platform.listing_terms import ListingSpec
from tokenmill.platform.listings import DEFAULT_PLATFORM_FEE_BPS, apply_listing, resolve_listing
from tokenmill.platform.pricing import Price
from tokenmill.platform.principal import KeyPrincipal


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass
class Account:
    org: OrgInfo
    user: UserInfo
    key: CreatedKey
    principal: KeyPrincipal


def make_account(
    db: Database, balance_micros: int = 0, *, tier: str = "default", **key_kwargs: Any
) -> Account:
    org = create_organization(db, unique("org"), tier=tier)
    user = create_user(db, org.id, f"{unique('user')}@example.com")
    key = create_key(db, user.id, name="test", **key_kwargs)
    if balance_micros:
        top_up(db, org.id, balance_micros, idempotency_key=unique("seed"))
    return Account(org, user, key, authenticate(db, key.key))


def priced_model(db: Database, input_micros_per_mtok: int, output_micros_per_mtok: int, **spec: Any) -> str:
    """A new model listed at this price (by the platform, public and published unless `spec` says else)."""
    model = unique("model")
    apply_listing(db, ListingSpec(model, price=Price(input_micros_per_mtok, output_micros_per_mtok), **spec))
    return model


def reserve_model(
    db: Database,
    principal: KeyPrincipal,
    model: str,
    prompt_tokens: int,
    max_tokens: int,
    *,
    owner: str = DEFAULT_OWNER,
    default_fee_bps: int = DEFAULT_PLATFORM_FEE_BPS,
) -> Reservation:
    """`billing.reserve` as admission calls it: on the listing the caller resolves, at its fee."""
    listing = resolve_listing(db, principal.org_id, model)
    return reserve(
        db,
        principal,
        listing,
        prompt_tokens,
        max_tokens,
        owner=owner,
        fee_bps=listing.fee_bps(default_fee_bps),
    )


class FakeClock:
    """Seconds since the epoch, moved by hand: rate-limit tests never sleep."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDateTime:
    """An aware-UTC datetime clock for `open_database(clock=...)` (expiry, per-day reports)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def reopen(db: Database, clock: Any) -> Database:
    """Another handle on the same database whose notion of 'now' the test controls. Close it after use."""
    return open_database(db.url.render_as_string(hide_password=False), clock=clock)
