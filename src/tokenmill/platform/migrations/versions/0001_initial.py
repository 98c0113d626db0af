"""Initial platform schema: organizations, users, keys, prices, ledger, reservations, usage.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_Id = sa.String(32)
_When = sa.DateTime(timezone=True)
_Micros = sa.BigInteger()
_Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", _Id, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("created_at", _When, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", _Id, primary_key=True),
        sa.Column("org_id", _Id, sa.ForeignKey("organizations.id"), nullable=False, index=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", _When, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", _Id, primary_key=True),
        sa.Column("org_id", _Id, sa.ForeignKey("organizations.id"), nullable=False, index=True),
        sa.Column("user_id", _Id, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        sa.Column("spend_limit_micros", _Micros, nullable=True),
        sa.Column("requests_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_concurrent_requests", sa.BigInteger(), nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("expires_at", _When, nullable=True),
        sa.Column("revoked_at", _When, nullable=True),
    )
    op.create_table(
        "admin_keys",
        sa.Column("id", _Id, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("revoked_at", _When, nullable=True),
    )
    op.create_table(
        "model_prices",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("input_micros_per_mtok", _Micros, nullable=False),
        sa.Column("output_micros_per_mtok", _Micros, nullable=False),
        sa.Column("updated_at", _When, nullable=False),
        sa.CheckConstraint("input_micros_per_mtok >= 0", name="ck_model_prices_input_nonneg"),
        sa.CheckConstraint("output_micros_per_mtok >= 0", name="ck_model_prices_output_nonneg"),
    )
    op.create_table(
        "reservations",
        sa.Column("id", _Id, primary_key=True),
        sa.Column("org_id", _Id, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", _Id, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("max_tokens", sa.BigInteger(), nullable=False),
        sa.Column("input_micros_per_mtok", _Micros, nullable=False),
        sa.Column("output_micros_per_mtok", _Micros, nullable=False),
        sa.Column("reserved_micros", _Micros, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("closed_at", _When, nullable=True),
        sa.CheckConstraint("state IN ('open', 'settled', 'released')", name="ck_reservation_state"),
        sa.CheckConstraint("reserved_micros >= 0", name="ck_reservation_nonneg"),
    )
    op.create_index("ix_reservations_org_state", "reservations", ["org_id", "state"])
    op.create_index("ix_reservations_key_state", "reservations", ["key_id", "state"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", _Serial, primary_key=True, autoincrement=True),
        sa.Column("org_id", _Id, sa.ForeignKey("organizations.id"), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_micros", _Micros, nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
        sa.Column("reservation_id", _Id, sa.ForeignKey("reservations.id"), nullable=True, unique=True),
        sa.Column("note", sa.String(500), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.CheckConstraint("kind IN ('topup', 'charge', 'refund', 'adjustment')", name="ck_ledger_kind"),
        sa.CheckConstraint(
            "(kind = 'topup' AND amount_micros > 0) OR (kind = 'refund' AND amount_micros > 0)"
            " OR (kind = 'charge' AND amount_micros < 0) OR (kind = 'adjustment' AND amount_micros <> 0)",
            name="ck_ledger_sign",
        ),
    )
    op.create_table(
        "usage_records",
        sa.Column("id", _Serial, primary_key=True, autoincrement=True),
        sa.Column("reservation_id", _Id, sa.ForeignKey("reservations.id"), nullable=False, unique=True),
        sa.Column("org_id", _Id, sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", _Id, sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("user_id", _Id, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", _Micros, nullable=False),
        sa.Column("latency_ms", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.CheckConstraint("status IN ('ok', 'client_disconnected', 'error')", name="ck_usage_status"),
        sa.CheckConstraint("cost_micros >= 0", name="ck_usage_cost_nonneg"),
    )
    op.create_index("ix_usage_org_day", "usage_records", ["org_id", "day"])
    op.create_index("ix_usage_key", "usage_records", ["key_id"])


def downgrade() -> None:
    for index, table in (
        ("ix_usage_key", "usage_records"),
        ("ix_usage_org_day", "usage_records"),
        ("ix_reservations_key_state", "reservations"),
        ("ix_reservations_org_state", "reservations"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "usage_records",
        "ledger_entries",
        "reservations",
        "model_prices",
        "admin_keys",
        "api_keys",
        "users",
        "organizations",
    ):
        op.drop_table(table)
