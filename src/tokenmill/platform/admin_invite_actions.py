"""The invite actions of `tokenmill admin`: while sign-up is by invitation (`serve --signup invite`, the
default), the operator hands out the codes these make. Changes go through `admin_ops`, so each is in the
audit log like the others; the table helpers are `admin_actions`'."""

from __future__ import annotations

import argparse
import sys

from tokenmill.platform import admin_ops, invites
from tokenmill.platform.admin_actions import cli_actor, format_when, print_table
from tokenmill.platform.db import Database


def create_invite(db: Database, args: argparse.Namespace) -> None:
    """The code on stdout alone, so a script can capture it; what it admits on stderr."""
    invite = admin_ops.create_invite(
        db, cli_actor(), note=args.note, max_uses=args.max_uses, expires_in_days=args.expires_in_days
    )
    print(invite.code)
    expiry = format_when(invite.expires_at) or "never"
    print(f"invite {invite.id}: {invite.max_uses} sign-up(s), expires {expiry}", file=sys.stderr)


def list_invites(db: Database, _: argparse.Namespace) -> None:
    print_table(
        ["id", "code", "uses", "max_uses", "note", "created", "expires", "revoked"],
        [
            (
                i.id,
                i.code,
                i.uses,
                i.max_uses,
                i.note,
                format_when(i.created_at),
                format_when(i.expires_at),
                format_when(i.revoked_at),
            )
            for i in invites.list_invites(db)
        ],
    )


def revoke_invite(db: Database, args: argparse.Namespace) -> None:
    invite = admin_ops.revoke_invite(db, cli_actor(), args.invite_id)
    print(f"revoked {invite.id} at {format_when(invite.revoked_at)}; {invite.uses} sign-up(s) used it")
