"""Accounts for people: sign-up with email and password, sign-in, sign-out, password change. No HTTP here.

A signed-in browser holds an ordinary API key of kind `session` (name "console session", valid for seven
days), not a session table's row: authentication, the read cache, rate limits and billing need nothing new
for it, and signing out is revoking it. Passwords are stored as argon2 hashes only. Sign-in is throttled per
email: after `FREE_FAILURES` consecutive failures each further try waits twice as long as the one before
(capped at `MAX_WAIT_S`), counted for unknown emails too, so guessing is slow and says nothing about who
has an account."""

from __future__ import annotations

import functools
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.platform.accounts import OrgInfo, UserInfo
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    EmailTaken,
    InvalidArgument,
    InvalidCredentials,
    InviteInvalid,
    KeyNotFound,
    LoginThrottled,
    OrganizationTaken,
    SignupClosed,
)
from tokenmill.platform.invites import INVITE_REFUSED, consume_invite
from tokenmill.platform.keys import generate_key, hash_key, visible_prefix
from tokenmill.platform.tables import ApiKey, LoginFailure, Organization, User, new_id
from tokenmill.platform.tiers import require_tier
from tokenmill.platform.validation import text

SIGNUP_MODES = ("open", "invite", "closed")
SIGNUP_TIER = "free"
"""The rate-limit tier of every organization made by sign-up (migration 0005 creates it)."""
SESSION_LIFETIME = timedelta(days=7)
SESSION_KEY_NAME = "console session"
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256
MAX_EMAIL_CHARS = 320
FREE_FAILURES = 3
"""Failed sign-ins in a row that cost nothing; the next one waits 1 s, then 2, 4, ..."""
MAX_WAIT_S = 900
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
_HASHER = PasswordHasher()


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a key signs its holder in as: its user and organization, and how it was made."""

    key_id: str
    kind: str
    """"password" (a sign-in's session key) or "api_key" (a key the person pasted)."""
    user: UserInfo
    org: OrgInfo
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class SignedIn:
    key: str
    """The session key's secret: it goes into the browser's cookie and nowhere else."""
    session: SessionInfo


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the email has no password, so an unknown email costs as long as a known one."""
    return hash_password(secrets.token_urlsafe(16))


def normalize_email(email: object) -> str:
    email = text("email", email, max_len=MAX_EMAIL_CHARS).lower()
    if not _EMAIL_RE.match(email):
        raise InvalidArgument("email: is not an email address")
    return email


def check_password(password: object, field: str = "password") -> str:
    """Kept as typed (no stripping: spaces may be part of it), valid text of 8 to 256 characters."""
    if not isinstance(password, str):
        raise InvalidArgument(f"{field}: must be a string")
    text(field, password, max_len=MAX_PASSWORD_CHARS * 2)  # valid Unicode, no NUL
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidArgument(
            f"{field}: must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long"
        )
    return password


def sign_up(
    db: Database,
    email: str,
    password: str,
    *,
    name: str = "",
    organization: str | None = None,
    invite_code: str | None = None,
    mode: str = "invite",
) -> SignedIn:
    """A new organization on the `free` tier (named `organization`, or after the email when not given), its
    first user with this password, and a session for them, in one transaction that also takes one use of
    the invite when sign-up is by invitation."""
    if mode not in SIGNUP_MODES:
        raise InvalidArgument(f"mode: must be one of {', '.join(SIGNUP_MODES)}")
    if mode == "closed":
        raise SignupClosed("Sign-up is closed on this server: ask its operator for an account.")
    if mode == "invite" and invite_code is None:
        raise InviteInvalid(INVITE_REFUSED)
    email = normalize_email(email)
    password_hash = hash_password(check_password(password))
    name = text("name", name, max_len=200, allow_empty=True) or email
    chosen = None if organization is None else text("organization", organization, max_len=200)
    org_name = chosen or f"{email.split('@')[0][:180]}-{secrets.token_hex(3)}"
    now = db.now()
    with db.write() as session:
        if mode == "invite":
            consume_invite(session, invite_code, now)
        require_tier(session, SIGNUP_TIER)
        if session.scalar(select(User.id).where(User.email == email)) is not None:
            raise EmailTaken("email: an account with this email already exists")
        if session.scalar(select(Organization.id).where(Organization.name == org_name)) is not None:
            raise OrganizationTaken(f"organization: an organization named {org_name!r} already exists")
        org = Organization(id=new_id("org"), name=org_name, tier=SIGNUP_TIER, created_at=now)
        user = User(
            id=new_id("user"),
            org_id=org.id,
            email=email,
            name=name,
            created_at=now,
            password_hash=password_hash,
        )
        session.add(org)
        _flush(session, OrganizationTaken(f"organization: an organization named {org_name!r} already exists"))
        session.add(user)
        _flush(session, EmailTaken("email: an account with this email already exists"))
        return _open_session(session, user, org, now)


def sign_in(db: Database, email: str, password: str) -> SignedIn:
    """A new session for the person with this email and password. A wrong password and an unknown email
    are the same `InvalidCredentials` after the same work; a throttled email is `LoginThrottled` whatever
    the password, and a success clears its failures."""
    try:
        email = normalize_email(email)
    except InvalidArgument:
        verify_password(_dummy_hash(), password if isinstance(password, str) else "")
        raise InvalidCredentials(InvalidCredentials.public_message) from None
    now = db.now()
    with db.read() as session:
        user = session.scalar(select(User).where(User.email == email))
        failure = session.get(LoginFailure, email)
    if failure is not None:
        wait = retry_after_s(failure.failures, failure.last_failure_at, now)
        if wait:
            raise LoginThrottled(wait)
    stored = user.password_hash if user is not None else None
    valid = isinstance(password, str) and verify_password(stored or _dummy_hash(), password)
    if not valid or stored is None or user is None:
        _record_failure(db, email, now)
        raise InvalidCredentials(InvalidCredentials.public_message)
    with db.write() as session:
        session.execute(LoginFailure.__table__.delete().where(LoginFailure.email == email))
        org = session.get(Organization, user.org_id)
        assert org is not None  # a foreign key
        return _open_session(session, user, org, now)


def retry_after_s(failures: int, last_failure_at: datetime, now: datetime) -> int:
    """Whole seconds until the next try is allowed after `failures` in a row (0: it is allowed now)."""
    if failures < FREE_FAILURES:
        return 0
    wait = MAX_WAIT_S if failures - FREE_FAILURES >= 10 else min(2 ** (failures - FREE_FAILURES), MAX_WAIT_S)
    remaining = (last_failure_at + timedelta(seconds=wait) - now).total_seconds()
    return max(1, math.ceil(remaining)) if remaining > 0 else 0


def sign_out(db: Database, raw_key: str) -> bool:
    """Revoke the key if it is a sign-in's session key; a key the person brought stays valid (signing out
    only drops it from the browser). True when a session was revoked."""
    with db.write() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == hash_key(raw_key), ApiKey.kind == "session")
            .where(ApiKey.revoked_at.is_(None))
            .values(revoked_at=db.now())
        )
        return bool(result.rowcount)


def change_password(db: Database, user_id: str, current: str, new: str, keep_key_id: str | None) -> int:
    """Set a new password if `current` is the present one, and sign out every other browser: each session
    key of the user but `keep_key_id` (the one asking) is revoked. Returns how many were."""
    new = check_password(new, "new_password")
    with db.read() as session:
        stored = session.scalar(select(User.password_hash).where(User.id == user_id))
    if not isinstance(current, str) or not verify_password(stored or _dummy_hash(), current) or not stored:
        raise InvalidCredentials(InvalidCredentials.public_message)
    new_hash = hash_password(new)
    with db.write() as session:
        session.execute(update(User).where(User.id == user_id).values(password_hash=new_hash))
        revoked = session.execute(
            update(ApiKey)
            .where(ApiKey.user_id == user_id, ApiKey.kind == "session", ApiKey.revoked_at.is_(None))
            .where(ApiKey.id != (keep_key_id or ""))
            .values(revoked_at=db.now())
        )
        return int(revoked.rowcount)


def session_of_key(db: Database, key_id: str) -> SessionInfo:
    """Who key `key_id` signs in as, whatever its state: the caller has authenticated it already."""
    query = (
        select(ApiKey, User, Organization)
        .join(User, User.id == ApiKey.user_id)
        .join(Organization, Organization.id == ApiKey.org_id)
        .where(ApiKey.id == key_id)
    )
    with db.read() as session:
        found = session.execute(query).first()
    if found is None:
        raise KeyNotFound(f"key_id: no key {key_id!r}")
    key, user, org = found
    return _session_info(key, user, org)


def _open_session(session: Session, user: User, org: Organization, now: datetime) -> SignedIn:
    raw = generate_key()
    key = ApiKey(
        id=new_id("key"),
        org_id=org.id,
        user_id=user.id,
        name=SESSION_KEY_NAME,
        prefix=visible_prefix(raw),
        key_hash=hash_key(raw),
        allowed_models=None,
        spend_limit_micros=None,
        requests_per_minute=None,
        tokens_per_minute=None,
        max_concurrent_requests=None,
        created_at=now,
        expires_at=now + SESSION_LIFETIME,
        revoked_at=None,
        kind="session",
    )
    session.add(key)
    session.flush()
    return SignedIn(raw, _session_info(key, user, org))


def _session_info(key: ApiKey, user: User, org: Organization) -> SessionInfo:
    return SessionInfo(
        key_id=key.id,
        kind="password" if key.kind == "session" else "api_key",
        user=UserInfo(user.id, user.org_id, user.email, user.name, user.created_at),
        org=OrgInfo(org.id, org.name, org.tier, org.created_at),
        expires_at=key.expires_at,
    )


def _flush(session: Session, conflict: Exception) -> None:
    """Another sign-up may take the same name between our check and our insert: its unique index says so."""
    try:
        session.flush()
    except IntegrityError as exc:
        raise conflict from exc


def _record_failure(db: Database, email: str, now: datetime) -> None:
    """One more failure in a row for `email`. Two failures racing to create the row: the loser counts on the
    winner's row, so none is lost."""
    for attempt in range(2):
        try:
            with db.write() as session:
                row = session.scalar(
                    select(LoginFailure).where(LoginFailure.email == email).with_for_update()
                )
                if row is None:
                    session.add(LoginFailure(email=email, failures=1, last_failure_at=now))
                else:
                    row.failures += 1
                    row.last_failure_at = now
            return
        except IntegrityError:
            if attempt:
                raise
