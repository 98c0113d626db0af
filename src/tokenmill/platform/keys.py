"""User API keys: `sk-` + a random secret, shown once, stored only as its sha256 plus a visible prefix.
Creation, listing and revocation, each scoped to one organization when the caller is a user. The keys of
console sign-ins (kind `session`) are `people.py`'s: here they do not exist, so no list shows them and no
one revokes them by id."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument, KeyNotFound, PermissionDenied, UnknownUser
from tokenmill.platform.tables import ApiKey, UsageRecord, User, new_id
from tokenmill.platform.validation import MAX_COUNT, optional_int, text

if TYPE_CHECKING:
    from tokenmill.platform.principal import KeyPrincipal

KEY_PREFIX = "sk-"
SECRET_BYTES = 32
"""token_urlsafe(32): 43 characters, 256 bits of entropy."""
VISIBLE_SECRET_CHARS = 6
MAX_SPEND_LIMIT_MICROS = 10**15
"""A billion currency units: above any real limit, and sums of such limits stay far from int64 overflow."""
LATEST_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
"""The last moment a datetime (and so every backend and API field) can hold."""
MAX_ALLOWED_MODELS = 1000


def generate_key(prefix: str = KEY_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(SECRET_BYTES)


def hash_key(raw_key: str) -> str:
    """sha256 is enough: the secret has 256 bits of entropy, so no slow password hash is needed."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def visible_prefix(raw_key: str, prefix: str = KEY_PREFIX) -> str:
    return raw_key[: len(prefix) + VISIBLE_SECRET_CHARS]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Everything about a key except its secret, which is never stored."""

    id: str
    org_id: str
    user_id: str
    name: str
    prefix: str
    allowed_models: tuple[str, ...] | None
    spend_limit_micros: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent_requests: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: str
    """The secret. Returned exactly once; only its hash is stored."""
    info: KeyInfo


def key_info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        org_id=row.org_id,
        user_id=row.user_id,
        name=row.name,
        prefix=row.prefix,
        allowed_models=tuple(row.allowed_models) if row.allowed_models is not None else None,
        spend_limit_micros=row.spend_limit_micros,
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        max_concurrent_requests=row.max_concurrent_requests,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def _check_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    if isinstance(models, str):
        raise InvalidArgument("allowed_models: must be a list of model ids, not one string")
    models = list(models)
    if len(models) > MAX_ALLOWED_MODELS:
        raise InvalidArgument(f"allowed_models: at most {MAX_ALLOWED_MODELS} model ids")
    cleaned = sorted({text(f"allowed_models[{i}]", m, max_len=200) for i, m in enumerate(models)})
    if not cleaned:
        raise InvalidArgument("allowed_models: an empty allow-list would block every model; pass None")
    return cleaned


def create_key(
    db: Database,
    user_id: str,
    *,
    name: str = "",
    allowed_models: Iterable[str] | None = None,
    spend_limit_micros: int | None = None,
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent_requests: int | None = None,
) -> CreatedKey:
    """Issue a key to `user_id` (its organization pays). The returned secret is not recoverable."""
    models = _check_models(allowed_models)
    name = text("name", name, max_len=200, allow_empty=True)
    if expires_at is not None and (expires_at.tzinfo is None or not db.now() < expires_at <= LATEST_EXPIRY):
        raise InvalidArgument(f"expires_at: must be an aware datetime in the future, at most {LATEST_EXPIRY}")
    limits = {
        "spend_limit_micros": optional_int(
            "spend_limit_micros", spend_limit_micros, minimum=0, maximum=MAX_SPEND_LIMIT_MICROS
        ),
        "requests_per_minute": optional_int(
            "requests_per_minute", requests_per_minute, minimum=1, maximum=MAX_COUNT
        ),
        "tokens_per_minute": optional_int(
            "tokens_per_minute", tokens_per_minute, minimum=1, maximum=MAX_COUNT
        ),
        "max_concurrent_requests": optional_int(
            "max_concurrent_requests", max_concurrent_requests, minimum=1, maximum=MAX_COUNT
        ),
    }
    raw = generate_key()
    with db.write() as session:
        user = session.get(User, user_id)
        if user is None:
            raise UnknownUser(f"user_id: no user {user_id!r}")
        row = ApiKey(
            id=new_id("key"),
            org_id=user.org_id,
            user_id=user.id,
            name=name,
            prefix=visible_prefix(raw),
            key_hash=hash_key(raw),
            allowed_models=models,
            **limits,
            created_at=db.now(),
            expires_at=expires_at,
            revoked_at=None,
            kind="api",
        )
        session.add(row)
        session.flush()
        return CreatedKey(key=raw, info=key_info(row))


def create_key_for_caller(
    db: Database,
    caller: KeyPrincipal,
    *,
    name: str = "",
    allowed_models: Iterable[str] | None = None,
    spend_limit_micros: int | None = None,
    expires_at: datetime | None = None,
) -> CreatedKey:
    """`POST /v1/keys`: a key for the caller's own user that can never do more than the caller's key
    (allow-list a subset, spend limit no higher, rate-limit overrides inherited)."""
    models = _check_models(allowed_models)
    if caller.allowed_models is not None:
        if models is None:
            models = list(caller.allowed_models)
        elif not set(models) <= set(caller.allowed_models):
            raise PermissionDenied("allowed_models: a key cannot grant models its creator may not use")
    limit = spend_limit_micros
    if caller.spend_limit_micros is not None:
        if limit is None:
            limit = caller.spend_limit_micros
        elif limit > caller.spend_limit_micros:
            raise PermissionDenied("spend_limit_micros: cannot exceed the creating key's own limit")
    return create_key(
        db,
        caller.user_id,
        name=name,
        allowed_models=models,
        spend_limit_micros=limit,
        expires_at=expires_at,
        requests_per_minute=caller.requests_per_minute,
        tokens_per_minute=caller.tokens_per_minute,
        max_concurrent_requests=caller.max_concurrent_requests,
    )


def _visible(row: ApiKey | None, key_id: str, org_id: str | None) -> ApiKey:
    if row is None or row.kind != "api" or (org_id is not None and row.org_id != org_id):
        raise KeyNotFound(f"key_id: no key {key_id!r}")
    return row


def get_key(db: Database, key_id: str, *, org_id: str | None = None) -> KeyInfo:
    with db.read() as session:
        return key_info(_visible(session.get(ApiKey, key_id), key_id, org_id))


def list_keys(db: Database, org_id: str, *, include_revoked: bool = True) -> list[KeyInfo]:
    query = (
        select(ApiKey)
        .where(ApiKey.org_id == org_id, ApiKey.kind == "api")
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with db.read() as session:
        return [key_info(r) for r in session.scalars(query)]


def revoke_key(db: Database, key_id: str, *, org_id: str | None = None) -> KeyInfo:
    """Revoke now; the next `authenticate` with it fails. `org_id` scopes the call to the caller's
    organization: a key of another organization is reported as not found. Revoking twice is a no-op."""
    with db.write() as session:
        row = _visible(session.get(ApiKey, key_id), key_id, org_id)
        if row.revoked_at is None:
            row.revoked_at = db.now()
        return key_info(row)


def last_used(db: Database, key_ids: Iterable[str]) -> dict[str, datetime]:
    """When each key last made a request that was billed (its newest usage record), for the key lists:
    one grouped query over the usage index on key_id. A key never used is absent."""
    key_ids = list(key_ids)
    if not key_ids:
        return {}
    query = (
        select(UsageRecord.key_id, func.max(UsageRecord.created_at))
        .where(UsageRecord.key_id.in_(key_ids))
        .group_by(UsageRecord.key_id)
    )
    with db.read() as session:
        return {key_id: moment for key_id, moment in session.execute(query).all()}
