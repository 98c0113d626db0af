"""Batch API: batches and their lines (each answered and charged in one transaction).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(32), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("discount_bps", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("expires_at", _When, nullable=False),
        sa.Column("in_progress_at", _When, nullable=True),
        sa.Column("finalizing_at", _When, nullable=True),
        sa.Column("completed_at", _When, nullable=True),
        sa.Column("failed_at", _When, nullable=True),
        sa.Column("expired_at", _When, nullable=True),
        sa.Column("cancelling_at", _When, nullable=True),
        sa.Column("cancelled_at", _When, nullable=True),
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', "
            "'cancelling', 'cancelled')",
            name="ck_batch_status",
        ),
    )
    op.create_index("ix_batches_org_created", "batches", ["org_id", "created_at"])
    op.create_index("ix_batches_owner_status", "batches", ["owner", "status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(40), sa.ForeignKey("batches.id"), primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(512), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("body", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_code", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("finished_at", _When, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="ck_batch_line_status"),
    )
    op.create_index("ix_batch_lines_batch_status", "batch_lines", ["batch_id", "status", "line"])


def downgrade() -> None:
    op.drop_index("ix_batch_lines_batch_status", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_owner_status", table_name="batches")
    op.drop_index("ix_batches_org_created", table_name="batches")
    op.drop_table("batches")
