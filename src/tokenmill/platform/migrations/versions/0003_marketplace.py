"""The marketplace: listings (who provides a model, to whom, on what terms), the provider's share of every
sale on reservations and usage records, `earning` ledger entries that credit it, and the admin audit log.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_Id = sa.String(32)
_When = sa.DateTime(timezone=True)
_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Written out, not imported: a migration keeps meaning what it meant when it shipped.
_OLD_KINDS = "kind IN ('topup', 'charge', 'refund', 'adjustment')"
_OLD_SIGN = (
    "(kind = 'topup' AND amount_micros > 0) OR (kind = 'refund' AND amount_micros > 0)"
    " OR (kind = 'charge' AND amount_micros < 0) OR (kind = 'adjustment' AND amount_micros <> 0)"
)
_NEW_KINDS = "kind IN ('topup', 'charge', 'refund', 'adjustment', 'earning')"
_NEW_SIGN = _OLD_SIGN + " OR (kind = 'earning' AND amount_micros > 0)"


def upgrade() -> None:
    op.create_table(
        "listings",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("provider_org_id", _Id, sa.ForeignKey("organizations.id"), nullable=True, index=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.String(4000), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("license", sa.String(100), nullable=False),
        sa.Column("context_length", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("visibility", sa.String(16), nullable=False),
        sa.Column("shared_with", sa.JSON(), nullable=False),
        sa.Column("platform_fee_bps", sa.BigInteger(), nullable=True),
        sa.Column("config_digest", sa.String(64), nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("updated_at", _When, nullable=False),
        sa.CheckConstraint("task IN ('chat', 'embedding')", name="ck_listing_task"),
        sa.CheckConstraint("status IN ('draft', 'published', 'retired')", name="ck_listing_status"),
        sa.CheckConstraint("visibility IN ('public', 'private', 'shared')", name="ck_listing_visibility"),
        sa.CheckConstraint(
            "platform_fee_bps IS NULL OR (platform_fee_bps >= 0 AND platform_fee_bps <= 10000)",
            name="ck_listing_fee",
        ),
    )
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("provider_org_id", _Id, nullable=True))
        batch.add_column(sa.Column("platform_fee_bps", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("provider_org_id", _Id, nullable=True))
        batch.add_column(sa.Column("provider_micros", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("platform_fee_micros", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.create_index("ix_usage_provider_day", ["provider_org_id", "day"])
    # Every earlier sale was the platform's own: all of it was the platform's fee.
    op.execute("UPDATE usage_records SET platform_fee_micros = cost_micros")
    # SQLite cannot alter a CHECK constraint: batch mode rebuilds the table (nothing references it).
    with op.batch_alter_table("ledger_entries", recreate="always") as batch:
        batch.drop_constraint("ck_ledger_kind", type_="check")
        batch.drop_constraint("ck_ledger_sign", type_="check")
        batch.create_check_constraint("ck_ledger_kind", _NEW_KINDS)
        batch.create_check_constraint("ck_ledger_sign", _NEW_SIGN)
    op.create_table(
        "audit_log",
        sa.Column("id", _Serial, primary_key=True, autoincrement=True),
        sa.Column("created_at", _When, nullable=False, index=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    op.execute("DELETE FROM ledger_entries WHERE kind = 'earning'")
    with op.batch_alter_table("ledger_entries", recreate="always") as batch:
        batch.drop_constraint("ck_ledger_kind", type_="check")
        batch.drop_constraint("ck_ledger_sign", type_="check")
        batch.create_check_constraint("ck_ledger_kind", _OLD_KINDS)
        batch.create_check_constraint("ck_ledger_sign", _OLD_SIGN)
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_index("ix_usage_provider_day")
        batch.drop_column("platform_fee_micros")
        batch.drop_column("provider_micros")
        batch.drop_column("provider_org_id")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("platform_fee_bps")
        batch.drop_column("provider_org_id")
    op.drop_table("listings")
