"""The Files API's metadata (`files`: one row per stored file of an organization, its bytes in the file
store) and each organization's data controls (`data_controls`: how long its files are kept).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

_When = sa.DateTime(timezone=True)
# Written out, not imported: a migration keeps meaning what it meant when it shipped.
_PURPOSES = (
    "fine-tune",
    "batch",
    "assistants",
    "vision",
    "user_data",
    "evals",
    "fine-tune-results",
    "batch_output",
)


def upgrade() -> None:
    purposes = ", ".join(f"'{purpose}'" for purpose in _PURPOSES)
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(32), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("storage_key", sa.String(300), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("expires_at", _When, nullable=True),
        sa.CheckConstraint(f"purpose IN ({purposes})", name="ck_files_purpose"),
        sa.CheckConstraint("bytes >= 0", name="ck_files_bytes_nonneg"),
    )
    op.create_index("ix_files_org_id", "files", ["org_id", "id"])
    op.create_index("ix_files_expires_at", "files", ["expires_at"])
    op.create_table(
        "data_controls",
        sa.Column("org_id", sa.String(32), sa.ForeignKey("organizations.id"), primary_key=True),
        sa.Column("file_retention_days", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", _When, nullable=False),
        sa.CheckConstraint(
            "file_retention_days IS NULL OR file_retention_days >= 1", name="ck_data_controls_retention"
        ),
    )


def downgrade() -> None:
    op.drop_table("data_controls")
    op.drop_index("ix_files_expires_at", table_name="files")
    op.drop_index("ix_files_org_id", table_name="files")
    op.drop_table("files")
