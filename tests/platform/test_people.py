"""People's accounts on real SQLite and PostgreSQL: sign-up in each mode with invites taken exactly once,
sign-in that says nothing about which emails exist, throttling that holds even the right password back,
sessions that are ordinary keys (authenticated, revoked at sign-out) yet never listed as keys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.platform.helpers import FakeDateTime, make_account, reopen, unique
from tokenmill import cli
from tokenmill.platform import admin_ops, invites, people
from tokenmill.platform.audit import list_audit
from tokenmill.platform.auth import authenticate
from tokenmill.platform.db import Database
from tokenmill.platform.errors import (
    EmailTaken,
    InvalidArgument,
    InvalidCredentials,
    InviteInvalid,
    KeyNotFound,
    LoginThrottled,
    OrganizationTaken,
    RevokedKey,
    SignupClosed,
)
from tokenmill.platform.keys import get_key, list_keys, revoke_key
from tokenmill.platform.ratelimit import RateLimits
from tokenmill.platform.tiers import get_tier

PASSWORD = "correct horse battery"


@pytest.fixture
def clock() -> FakeDateTime:
    return FakeDateTime()


@pytest.fixture
def timed(db: Database, clock: FakeDateTime) -> Iterator[Database]:
    """The module's database, with a clock the test moves."""
    handle = reopen(db, clock)
    yield handle
    handle.close()


def _email() -> str:
    return f"{unique('person')}@example.com"


def test_open_sign_up_makes_an_organization_on_the_free_tier_and_a_session(timed: Database) -> None:
    email = _email()
    signed = people.sign_up(timed, f"  {email.upper()} ", PASSWORD, mode="open")
    info = signed.session
    assert info.kind == "password" and info.user.email == email and info.user.name == email
    assert info.org.tier == "free" and info.org.name.startswith(email.split("@")[0] + "-")
    assert info.expires_at == timed.now() + timedelta(days=7)
    principal = authenticate(timed, signed.key)
    assert (principal.user_id, principal.org_id, principal.tier) == (info.user.id, info.org.id, "free")
    assert list_keys(timed, info.org.id) == []  # the session is no key of the organization's lists
    with pytest.raises(KeyNotFound):
        revoke_key(timed, info.key_id, org_id=info.org.id)
    free = get_tier(timed, "free")
    assert (free.paid, free.free) == (RateLimits(60, 100_000, 4), RateLimits(120, 200_000, 16))


def test_sign_up_refuses_a_taken_email_or_organization_and_bad_input(timed: Database) -> None:
    email, org = _email(), unique("org")
    people.sign_up(timed, email, PASSWORD, organization=org, name="Ada", mode="open")
    with pytest.raises(EmailTaken):
        people.sign_up(timed, email.upper(), PASSWORD, mode="open")
    with pytest.raises(OrganizationTaken):
        people.sign_up(timed, _email(), PASSWORD, organization=org, mode="open")
    for bad_email, password in (("not-an-email", PASSWORD), (_email(), "short"), (_email(), "x" * 257)):
        with pytest.raises(InvalidArgument):
            people.sign_up(timed, bad_email, password, mode="open")


def test_closed_sign_up_refuses_everyone(timed: Database) -> None:
    code = invites.create_invite(timed, "cli:test").code
    with pytest.raises(SignupClosed):
        people.sign_up(timed, _email(), PASSWORD, invite_code=code, mode="closed")


def test_invites_admit_as_many_sign_ups_as_they_say_until_revoked_or_expired(
    timed: Database, clock: FakeDateTime
) -> None:
    with pytest.raises(InviteInvalid):
        people.sign_up(timed, _email(), PASSWORD, mode="invite")
    with pytest.raises(InviteInvalid):
        people.sign_up(timed, _email(), PASSWORD, invite_code="no-such-code", mode="invite")

    twice = admin_ops.create_invite(timed, "cli:test", max_uses=2, note="for two")
    taken = _email()
    people.sign_up(timed, taken, PASSWORD, invite_code=twice.code, mode="invite")
    with pytest.raises(EmailTaken):  # a refused sign-up takes no use
        people.sign_up(timed, taken, PASSWORD, invite_code=twice.code, mode="invite")
    assert invites.get_invite(timed, twice.id).uses == 1
    people.sign_up(timed, _email(), PASSWORD, invite_code=twice.code, mode="invite")
    assert invites.get_invite(timed, twice.id).uses == 2
    with pytest.raises(InviteInvalid):  # used up
        people.sign_up(timed, _email(), PASSWORD, invite_code=twice.code, mode="invite")

    clock.advance(seconds=1)
    revoked = admin_ops.create_invite(timed, "cli:test")
    admin_ops.revoke_invite(timed, "cli:test", revoked.id)
    with pytest.raises(InviteInvalid):
        people.sign_up(timed, _email(), PASSWORD, invite_code=revoked.code, mode="invite")

    clock.advance(seconds=1)
    expiring = admin_ops.create_invite(timed, "cli:test", expires_in_days=1)
    clock.advance(days=1)
    with pytest.raises(InviteInvalid):
        people.sign_up(timed, _email(), PASSWORD, invite_code=expiring.code, mode="invite")
    assert invites.get_invite(timed, expiring.id).uses == 0

    actions = [entry.action for entry in list_audit(timed, limit=10, target=revoked.id)]
    assert actions == ["revoke_invite", "create_invite"]
    mine = {expiring.id, revoked.id, twice.id}
    assert [i.id for i in invites.list_invites(timed) if i.id in mine] == [expiring.id, revoked.id, twice.id]


def test_invite_limits_are_checked(timed: Database) -> None:
    before = len(invites.list_invites(timed))
    with pytest.raises(InvalidArgument, match="expires_in_days"):
        admin_ops.create_invite(timed, "cli:test", expires_in_days=366)
    with pytest.raises(InvalidArgument, match="max_uses"):
        admin_ops.create_invite(timed, "cli:test", max_uses=10_001)
    assert len(invites.list_invites(timed)) == before


def test_wrong_password_and_unknown_email_are_the_same_refusal(timed: Database) -> None:
    email = _email()
    people.sign_up(timed, email, PASSWORD, mode="open")
    signed = people.sign_in(timed, f" {email.upper()}", PASSWORD)
    assert authenticate(timed, signed.key).user_id == signed.session.user.id
    refusals = []
    for login, password in ((email, "wrong password"), (_email(), PASSWORD), ("nobody", PASSWORD)):
        with pytest.raises(InvalidCredentials) as refused:
            people.sign_in(timed, login, password)
        refusals.append(str(refused.value))
    assert refusals == ["Incorrect email or password."] * 3


def test_failed_sign_ins_are_throttled_even_with_the_right_password(
    timed: Database, clock: FakeDateTime
) -> None:
    email = _email()
    people.sign_up(timed, email, PASSWORD, mode="open")
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            people.sign_in(timed, email, "wrong password")
    with pytest.raises(LoginThrottled) as throttled:
        people.sign_in(timed, email, PASSWORD)
    assert throttled.value.retry_after_s == 1
    clock.advance(seconds=1)
    with pytest.raises(InvalidCredentials):  # a fourth failure: the wait doubles
        people.sign_in(timed, email, "wrong password")
    clock.advance(seconds=1.5)
    with pytest.raises(LoginThrottled) as throttled:
        people.sign_in(timed, email, PASSWORD)
    assert throttled.value.retry_after_s == 1  # 0.5 s left, rounded up
    clock.advance(seconds=0.5)
    people.sign_in(timed, email, PASSWORD)
    with pytest.raises(InvalidCredentials):  # the success cleared the count: no wait now
        people.sign_in(timed, email, "wrong password")

    stranger = _email()  # unknown emails are counted too, so throttling tells nothing
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            people.sign_in(timed, stranger, PASSWORD)
    with pytest.raises(LoginThrottled):
        people.sign_in(timed, stranger, PASSWORD)


def test_the_wait_grows_to_fifteen_minutes_at_most(clock: FakeDateTime) -> None:
    now = clock()
    assert [people.retry_after_s(n, now, now) for n in (0, 2, 3, 4, 5, 12, 13, 10_000)] == [
        0,
        0,
        1,
        2,
        4,
        512,
        900,
        900,
    ]
    assert people.retry_after_s(13, now, now + timedelta(seconds=900)) == 0


def test_sign_out_revokes_a_session_but_not_a_key_brought_to_sign_in(timed: Database) -> None:
    email = _email()
    signed = people.sign_up(timed, email, PASSWORD, mode="open")
    assert people.sign_out(timed, signed.key) is True
    with pytest.raises(RevokedKey):
        authenticate(timed, signed.key)
    assert people.sign_out(timed, signed.key) is False

    account = make_account(timed)
    assert people.sign_out(timed, account.key.key) is False
    assert get_key(timed, account.key.info.id).revoked_at is None


def test_changing_the_password_signs_out_every_other_session(timed: Database) -> None:
    email = _email()
    first = people.sign_up(timed, email, PASSWORD, mode="open")
    second = people.sign_in(timed, email, PASSWORD)
    user_id = first.session.user.id
    with pytest.raises(InvalidCredentials):
        people.change_password(timed, user_id, "not the password", "a new password", second.session.key_id)
    with pytest.raises(InvalidArgument, match="new_password"):
        people.change_password(timed, user_id, PASSWORD, "short", second.session.key_id)

    revoked = people.change_password(timed, user_id, PASSWORD, "a new password", second.session.key_id)
    assert revoked == 1
    with pytest.raises(RevokedKey):
        authenticate(timed, first.key)
    assert authenticate(timed, second.key).user_id == user_id
    with pytest.raises(InvalidCredentials):
        people.sign_in(timed, email, PASSWORD)
    people.sign_in(timed, email, "a new password")


def test_a_user_without_a_password_cannot_sign_in_with_one(timed: Database) -> None:
    account = make_account(timed)  # made by the operator: keys only
    with pytest.raises(InvalidCredentials):
        people.sign_in(timed, account.user.email, PASSWORD)
    with pytest.raises(InvalidCredentials):
        people.change_password(timed, account.user.id, PASSWORD, "a new password", None)


def test_the_operator_makes_and_revokes_invites_on_the_command_line(
    db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def admin(*args: str) -> str:
        url = db.url.render_as_string(hide_password=False)
        status = cli.main(["admin", *args, "--data-dir", str(tmp_path), "--database-url", url])
        out, err = capsys.readouterr()
        assert status == 0, err
        return out.strip()

    code = admin("create-invite", "--max-uses", "3", "--expires-in-days", "30", "--note", "team")
    (invite,) = [i for i in invites.list_invites(db) if i.code == code]
    assert (invite.max_uses, invite.note, invite.uses) == (3, "team", 0) and invite.expires_at is not None
    assert invite.created_by.startswith("cli:") and len(code) == 16
    people.sign_up(db, _email(), PASSWORD, invite_code=code, mode="invite")
    assert code in admin("list-invites")
    assert "1 sign-up(s) used it" in admin("revoke-invite", invite.id)
    with pytest.raises(InviteInvalid):
        people.sign_up(db, _email(), PASSWORD, invite_code=code, mode="invite")
