"""Accounts for people: a password on users, session keys (`api_keys.kind = 'session'`: a browser's sign-in
is an ordinary key, so authentication, rate limits and billing treat it like any other), invite codes for
sign-up, per-email login failures for throttling, and the `free` tier that self-service sign-ups start on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_When = sa.DateTime(timezone=True)
_KIND_CHECK = "kind IN ('api', 'session')"
# Written out, not imported: a migration keeps meaning what it meant when it shipped. Paid limits, then free
# ones: the free models as `default` has them, a taste of the paid ones.
_LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "free_requests_per_minute",
    "free_tokens_per_minute",
    "free_max_concurrent_requests",
)
_FREE_TIER = (60, 100_000, 4, 120, 200_000, 16)


def upgrade() -> None:
    op.add_column("users", sa.Column("password_hash", sa.String(200), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        # ADD COLUMN with its CHECK inline: the batch mode's table rebuild would drop the access-revision
        # triggers of 0004 and trip over the foreign keys that reference api_keys.
        op.execute(
            "ALTER TABLE api_keys ADD COLUMN kind VARCHAR(16) DEFAULT 'api' NOT NULL "
            f"CONSTRAINT ck_api_keys_kind CHECK ({_KIND_CHECK})"
        )
    else:
        op.add_column("api_keys", sa.Column("kind", sa.String(16), nullable=False, server_default="api"))
        op.create_check_constraint("ck_api_keys_kind", "api_keys", _KIND_CHECK)
    op.create_table(
        "invites",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("code", sa.String(64), nullable=False, unique=True),
        sa.Column("note", sa.String(200), nullable=False),
        sa.Column("max_uses", sa.BigInteger(), nullable=False),
        sa.Column("uses", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", _When, nullable=True),
        sa.Column("revoked_at", _When, nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.CheckConstraint("max_uses >= 1", name="ck_invites_max_uses"),
        sa.CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_invites_uses"),
    )
    op.create_table(
        "login_failures",
        sa.Column("email", sa.String(320), primary_key=True),
        sa.Column("failures", sa.BigInteger(), nullable=False),
        sa.Column("last_failure_at", _When, nullable=False),
    )
    bind = op.get_bind()
    exists = bind.execute(sa.text("SELECT 1 FROM rate_limit_tiers WHERE name = 'free'")).first()
    if exists is None:
        values = dict(zip(_LIMITS, _FREE_TIER, strict=True))
        columns = ", ".join(("name", *_LIMITS, "updated_at"))
        params = ", ".join(f":{name}" for name in ("name", *_LIMITS, "updated_at"))
        bind.execute(
            sa.text(f"INSERT INTO rate_limit_tiers ({columns}) VALUES ({params})").bindparams(
                sa.bindparam("updated_at", type_=_When)
            ),
            {"name": "free", **values, "updated_at": _now(bind.dialect.name)},
        )


def _now(dialect: str) -> datetime:
    """SQLite keeps datetimes naive (in UTC), as the platform's own column type writes them."""
    now = datetime.now(UTC)
    return now.replace(tzinfo=None) if dialect == "sqlite" else now


def downgrade() -> None:
    # The `free` tier stays while an organization is on it: no organization may name a missing tier.
    op.execute(
        "DELETE FROM rate_limit_tiers WHERE name = 'free' "
        "AND NOT EXISTS (SELECT 1 FROM organizations WHERE tier = 'free')"
    )
    op.drop_table("login_failures")
    op.drop_table("invites")
    op.execute("UPDATE api_keys SET revoked_at = created_at WHERE kind = 'session' AND revoked_at IS NULL")
    # Plain DROP COLUMN on both backends (SQLite 3.35+): each column's CHECK goes with it, and no table is
    # rebuilt, so the triggers and the foreign keys stay as they are.
    op.execute("ALTER TABLE api_keys DROP COLUMN kind")
    op.execute("ALTER TABLE users DROP COLUMN password_hash")
