"""Authentication: a raw bearer key -> `KeyPrincipal` (user keys) or `AdminPrincipal` (operator keys).
Every failure is a typed `AuthenticationError`; the HTTP layer maps them all to one identical 401."""

from __future__ import annotations

import hmac
import re
from datetime import datetime

from sqlalchemy import Select, select

from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    ExpiredKey,
    KeyNotFound,
    MalformedKey,
    MissingKey,
    ModelNotAllowed,
    RevokedKey,
    UnknownKey,
)
from tokenmill.platform.keys import hash_key
from tokenmill.platform.principal import AdminPrincipal, KeyPrincipal
from tokenmill.platform.tables import AdminKey, ApiKey, Organization, RateLimitTier
from tokenmill.platform.tiers import tier_limits

ADMIN_KEY_PREFIX = "sk-admin-"
_KEY_RE = re.compile(r"^sk-[A-Za-z0-9_-]{20,200}$")


def parse_key(raw_key: str | None) -> str:
    """Shape check before any database work: `sk-` plus a URL-safe secret."""
    if raw_key is None or not raw_key.strip():
        raise MissingKey("no API key provided")
    raw_key = raw_key.strip()
    if not _KEY_RE.match(raw_key):
        raise MalformedKey("the API key is not of the form sk-...")
    return raw_key


def authenticate(db: Database, raw_key: str | None) -> KeyPrincipal:
    """Resolve a user key. Revocation, expiry and the tier's limits are read from the database on every
    call, so a change to any of them takes effect on the next request. Admin keys are not user keys and fail
    here as unknown."""
    raw_key = parse_key(raw_key)
    digest = hash_key(raw_key)
    with db.read() as session:
        found = session.execute(_principal_query().where(ApiKey.key_hash == digest)).first()
    # The lookup is by hash, so its timing says nothing useful about the secret; compare_digest keeps the
    # final check constant-time anyway.
    if found is None or not hmac.compare_digest(found[0].key_hash, digest):
        raise UnknownKey("no such API key")
    return _active(db, *found)


def reject_expired(principal: KeyPrincipal, now: datetime) -> KeyPrincipal:
    """Expiry is a moment, not a commit: checked again whenever a remembered principal is used."""
    if principal.expires_at is not None and now >= principal.expires_at:
        raise ExpiredKey(f"API key {principal.key_prefix}... expired")
    return principal


def principal_of_key(db: Database, key_id: str) -> KeyPrincipal:
    """The principal key `key_id` authenticates as (revoked or expired or not), for operator tools such as
    `tokenmill admin show-limits`."""
    with db.read() as session:
        found = session.execute(_principal_query().where(ApiKey.id == key_id)).first()
    if found is None:
        raise KeyNotFound(f"key_id: no key {key_id!r}")
    return _principal(*found)


def active_principal_of_key(db: Database, key_id: str) -> KeyPrincipal:
    """For work a key started earlier (a batch): the key as of now, refused as `authenticate` would refuse
    it if it has since been revoked or has expired."""
    with db.read() as session:
        found = session.execute(_principal_query().where(ApiKey.id == key_id)).first()
    if found is None:
        raise UnknownKey("no such API key")
    return _active(db, *found)


def _active(db: Database, row: ApiKey, tier: str, tier_row: RateLimitTier | None) -> KeyPrincipal:
    """The key's principal, refused if it has been revoked or has expired."""
    if row.revoked_at is not None:
        raise RevokedKey(f"API key {row.prefix}... was revoked")
    return reject_expired(_principal(row, tier, tier_row), db.now())


def _principal_query() -> Select[tuple[ApiKey, str, RateLimitTier | None]]:
    # An outer join: a tier row missing (only a hand-edited database can lose one) must not make the key
    # look unknown; `tiers.effective_limits` then reports the tier itself as not found.
    return (
        select(ApiKey, Organization.tier, RateLimitTier)
        .join(Organization, Organization.id == ApiKey.org_id)
        .outerjoin(RateLimitTier, RateLimitTier.name == Organization.tier)
    )


def _principal(row: ApiKey, tier: str, tier_row: RateLimitTier | None) -> KeyPrincipal:
    return KeyPrincipal(
        key_id=row.id,
        key_prefix=row.prefix,
        org_id=row.org_id,
        user_id=row.user_id,
        tier=tier,
        allowed_models=frozenset(row.allowed_models) if row.allowed_models is not None else None,
        spend_limit_micros=row.spend_limit_micros,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        max_concurrent_requests=row.max_concurrent_requests,
        expires_at=row.expires_at,
        tier_limits=None if tier_row is None else tier_limits(tier_row),
    )


def authenticate_admin(db: Database, raw_key: str | None) -> AdminPrincipal:
    """Resolve an operator key (`sk-admin-...`, table `admin_keys`); user keys fail here as unknown."""
    raw_key = parse_key(raw_key)
    if not raw_key.startswith(ADMIN_KEY_PREFIX):
        raise UnknownKey("not an admin key")
    digest = hash_key(raw_key)
    with db.read() as session:
        row = session.scalar(select(AdminKey).where(AdminKey.key_hash == digest))
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise UnknownKey("no such admin key")
    if row.revoked_at is not None:
        raise RevokedKey(f"admin key {row.prefix}... was revoked")
    return AdminPrincipal(key_id=row.id, key_prefix=row.prefix, name=row.name)


def authorize_model(principal: KeyPrincipal, model: str) -> None:
    """403 material: the key is valid but its allow-list does not include `model`."""
    if not principal.may_use(model):
        raise ModelNotAllowed(model)
