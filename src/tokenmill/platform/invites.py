"""Invite codes: while sign-up is by invitation (`tokenmill serve --signup invite`, the default), a person signs
up with a code the operator made (`tokenmill admin create-invite`, `POST /v1/admin/invites`). A code admits
`max_uses` sign-ups until it expires or is revoked; each sign-up takes one use inside its own transaction,
so a code can never admit more people than it says. The operator's changes go through `admin_ops`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument, InviteInvalid, InviteNotFound
from tokenmill.platform.tables import Invite, new_id
from tokenmill.platform.validation import optional_int, text

CODE_BYTES = 12
"""token_urlsafe(12): 16 URL-safe characters, 96 bits: short enough to paste, too many to guess."""
MAX_USES = 10_000
MAX_CODE_CHARS = 64
INVITE_REFUSED = "The invite code is not valid: it is unknown, revoked, expired or used up."


@dataclass(frozen=True, slots=True)
class InviteInfo:
    id: str
    code: str
    note: str
    max_uses: int
    uses: int
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    created_by: str

    def admits(self, now: datetime) -> bool:
        """Whether one more person may sign up with it now."""
        unexpired = self.expires_at is None or now < self.expires_at
        return self.revoked_at is None and unexpired and self.uses < self.max_uses


def invite_info(row: Invite) -> InviteInfo:
    return InviteInfo(
        id=row.id,
        code=row.code,
        note=row.note,
        max_uses=row.max_uses,
        uses=row.uses,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def create_invite(
    db: Database, created_by: str, *, note: str = "", max_uses: int = 1, expires_at: datetime | None = None
) -> InviteInfo:
    note = text("note", note, max_len=200, allow_empty=True)
    checked_uses = optional_int("max_uses", max_uses, minimum=1, maximum=MAX_USES)
    if checked_uses is None:
        raise InvalidArgument(f"max_uses: must be an integer from 1 to {MAX_USES}")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= db.now()):
        raise InvalidArgument("expires_at: must be an aware datetime in the future")
    with db.write() as session:
        row = Invite(
            id=new_id("inv"),
            code=secrets.token_urlsafe(CODE_BYTES),
            note=note,
            max_uses=checked_uses,
            uses=0,
            expires_at=expires_at,
            revoked_at=None,
            created_at=db.now(),
            created_by=created_by,
        )
        session.add(row)
        session.flush()
        return invite_info(row)


def list_invites(db: Database) -> list[InviteInfo]:
    """Newest first."""
    query = select(Invite).order_by(Invite.created_at.desc(), Invite.id.desc())
    with db.read() as session:
        return [invite_info(row) for row in session.scalars(query)]


def get_invite(db: Database, invite_id: str) -> InviteInfo:
    with db.read() as session:
        row = session.get(Invite, text("invite_id", invite_id, max_len=200))
        if row is None:
            raise InviteNotFound(f"invite_id: no invite {invite_id!r}")
        return invite_info(row)


def revoke_invite(db: Database, invite_id: str) -> InviteInfo:
    """No one signs up with it from now on; those who did keep their accounts. Revoking twice is a no-op."""
    with db.write() as session:
        row = session.get(Invite, text("invite_id", invite_id, max_len=200))
        if row is None:
            raise InviteNotFound(f"invite_id: no invite {invite_id!r}")
        if row.revoked_at is None:
            row.revoked_at = db.now()
        return invite_info(row)


def consume_invite(session: Session, code: str | None, now: datetime) -> InviteInfo:
    """Take one use of the code inside the sign-up's transaction (row-locked on PostgreSQL, the write lock
    on SQLite), so two sign-ups racing for a code's last use cannot both have it."""
    if not isinstance(code, str) or not code.strip() or len(code.strip()) > MAX_CODE_CHARS:
        raise InviteInvalid(INVITE_REFUSED)
    row = session.scalar(select(Invite).where(Invite.code == code.strip()).with_for_update())
    if row is None or not invite_info(row).admits(now):
        raise InviteInvalid(INVITE_REFUSED)
    row.uses += 1
    return invite_info(row)
