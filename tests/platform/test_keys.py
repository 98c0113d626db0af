"""API key lifecycle: shown once, stored as a hash, revocation and expiry effective on the next request,
organizations isolated from each other, model allow-lists, and the separate admin key."""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.platform.helpers import FakeDateTime, make_account, reopen, unique
from tokenmill.platform.admin_key import admin_key_path, ensure_admin_key, rotate_admin_key
from tokenmill.platform.auth import authenticate, authenticate_admin, authorize_model
from tokenmill.platform.db import Database, open_database
from tokenmill.platform.errors import (
    AuthenticationError,
    ExpiredKey,
    InvalidArgument,
    KeyNotFound,
    MalformedKey,
    MissingKey,
    ModelNotAllowed,
    PermissionDenied,
    RevokedKey,
    UnknownKey,
    UnknownUser,
)
from tokenmill.platform.keys import create_key, create_key_for_caller, get_key, list_keys, revoke_key
from tokenmill.platform.migrate import upgrade
from tokenmill.platform.tables import ApiKey


def test_a_key_is_shown_once_and_only_its_hash_is_stored(db: Database) -> None:
    account = make_account(db)
    raw = account.key.key
    assert raw.startswith("sk-") and len(raw) >= 40
    assert raw not in repr(account.key.info)  # the info that lists and APIs return has no secret
    with db.read() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.id == account.key.info.id)).one()
        stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert row.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert all(raw not in value and raw[3:] not in value for value in stored)
    assert raw.startswith(row.prefix) and len(row.prefix) < 12
    principal = authenticate(db, raw)
    assert (principal.key_id, principal.org_id, principal.user_id) == (
        account.key.info.id,
        account.org.id,
        account.user.id,
    )
    assert authenticate(db, f"  {raw} ").key_id == principal.key_id  # header whitespace is tolerated


@pytest.mark.parametrize(
    ("raw_key", "error"),
    [
        (None, MissingKey),
        ("", MissingKey),
        ("Bearer sk-abc", MalformedKey),
        ("sk-short", MalformedKey),
        ("pk-" + "a" * 43, MalformedKey),
        ("sk-" + "a" * 43, UnknownKey),
    ],
)
def test_bad_keys_raise_typed_errors_that_share_one_public_message(
    db: Database, raw_key: str | None, error: type[AuthenticationError]
) -> None:
    with pytest.raises(error) as caught:
        authenticate(db, raw_key)
    assert caught.value.public_message == AuthenticationError.public_message


def test_revocation_takes_effect_on_the_next_request(db: Database) -> None:
    account = make_account(db)
    authenticate(db, account.key.key)
    revoked = revoke_key(db, account.key.info.id, org_id=account.org.id)
    assert revoked.revoked_at is not None
    with pytest.raises(RevokedKey):
        authenticate(db, account.key.key)
    assert revoke_key(db, account.key.info.id).revoked_at == revoked.revoked_at  # twice: no-op


def test_expiry_takes_effect_without_restart(db: Database) -> None:
    clock = FakeDateTime()
    timed = reopen(db, clock)
    try:
        account = make_account(timed)
        key = create_key(timed, account.user.id, expires_at=clock.now + timedelta(minutes=5))
        authenticate(timed, key.key)
        clock.advance(minutes=4, seconds=59)
        authenticate(timed, key.key)
        clock.advance(seconds=1)
        with pytest.raises(ExpiredKey):
            authenticate(timed, key.key)
        with pytest.raises(InvalidArgument, match="expires_at"):
            create_key(timed, account.user.id, expires_at=clock.now - timedelta(seconds=1))
    finally:
        timed.close()


def test_organizations_cannot_see_or_revoke_each_others_keys(db: Database) -> None:
    mine, theirs = make_account(db), make_account(db)
    assert [k.id for k in list_keys(db, mine.org.id)] == [mine.key.info.id]
    with pytest.raises(KeyNotFound):
        revoke_key(db, theirs.key.info.id, org_id=mine.org.id)
    with pytest.raises(KeyNotFound):
        get_key(db, theirs.key.info.id, org_id=mine.org.id)
    authenticate(db, theirs.key.key)  # untouched
    with pytest.raises(UnknownUser):
        create_key(db, "user_doesnotexist")


def test_allow_list_limits_models_and_keys_created_by_a_key_cannot_widen_it(db: Database) -> None:
    account = make_account(db, allowed_models=["small", "tiny"], spend_limit_micros=1_000)
    principal = account.principal
    authorize_model(principal, "small")
    with pytest.raises(ModelNotAllowed):
        authorize_model(principal, "large")

    child = create_key_for_caller(db, principal, name="ci")
    assert child.info.allowed_models == ("small", "tiny") and child.info.spend_limit_micros == 1_000
    narrower = create_key_for_caller(db, principal, allowed_models=["tiny"], spend_limit_micros=10)
    assert authenticate(db, narrower.key).allowed_models == frozenset({"tiny"})
    with pytest.raises(PermissionDenied):
        create_key_for_caller(db, principal, allowed_models=["large"])
    with pytest.raises(PermissionDenied):
        create_key_for_caller(db, principal, spend_limit_micros=1_001)
    with pytest.raises(InvalidArgument):
        create_key(db, account.user.id, allowed_models=[])
    assert len(list_keys(db, account.org.id)) == 3  # the refused ones wrote nothing


def test_admin_key_is_created_once_written_0600_and_separate_from_user_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tokenmill.db'}"
    upgrade(url)
    db = open_database(url)
    try:
        first = ensure_admin_key(db, tmp_path)
        assert first is not None and first.startswith("sk-admin-")
        path = admin_key_path(tmp_path)
        assert path.read_text().strip() == first
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert ensure_admin_key(db, tmp_path) is None  # second start: nothing printed, file unchanged
        assert path.read_text().strip() == first

        assert authenticate_admin(db, first).key_prefix == first[:15]
        with pytest.raises(UnknownKey):
            authenticate(db, first)  # an admin key is not a user key...
        user_key = make_account(db).key.key
        with pytest.raises(UnknownKey):
            authenticate_admin(db, user_key)  # ...and a user key is never an admin key

        second = rotate_admin_key(db, tmp_path)
        assert path.read_text().strip() == second
        with pytest.raises(RevokedKey):
            authenticate_admin(db, first)
        authenticate_admin(db, second)
    finally:
        db.close()


def test_key_names_and_limits_are_validated(db: Database) -> None:
    account = make_account(db)
    with pytest.raises(InvalidArgument, match="spend_limit_micros"):
        create_key(db, account.user.id, spend_limit_micros=-1)
    with pytest.raises(InvalidArgument, match="requests_per_minute"):
        create_key(db, account.user.id, requests_per_minute=0)
    with pytest.raises(InvalidArgument, match="allowed_models"):
        create_key(db, account.user.id, allowed_models=unique("model"))  # a string, not a list
