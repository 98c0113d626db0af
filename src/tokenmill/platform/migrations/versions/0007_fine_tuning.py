"""Fine-tuning: jobs (a queue the trainer workers claim from), their events and checkpoints, and the
adapter models they produce (each also a listing of the same id).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(32), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("base_source", sa.String(1000), nullable=False),
        sa.Column("max_tokens_per_example", sa.BigInteger(), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("fine_tuned_model", sa.String(200), nullable=True),
        sa.Column("estimated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column(
            "reservation_id", sa.String(32), sa.ForeignKey("reservations.id"), nullable=False, unique=True
        ),
        sa.Column("cancel_requested_at", _When, nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", _When, nullable=True),
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("started_at", _When, nullable=True),
        sa.Column("finished_at", _When, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_fine_tuning_job_status",
        ),
    )
    op.create_index("ix_fine_tuning_jobs_org_created", "fine_tuning_jobs", ["org_id", "created_at"])
    op.create_index("ix_fine_tuning_jobs_status_created", "fine_tuning_jobs", ["status", "created_at"])
    op.create_table(
        "fine_tuning_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.String(2000), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.CheckConstraint("type IN ('message', 'metrics')", name="ck_fine_tuning_event_type"),
    )
    op.create_index("ix_fine_tuning_events_job", "fine_tuning_events", ["job_id", "id"])
    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("created_at", _When, nullable=False),
    )
    op.create_index("ix_fine_tuning_checkpoints_job", "fine_tuning_checkpoints", ["job_id", "step"])
    op.create_table(
        "adapter_models",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("org_id", sa.String(32), sa.ForeignKey("organizations.id"), nullable=False),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id"), nullable=False, unique=True),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("created_at", _When, nullable=False),
    )
    op.create_index("ix_adapter_models_org_id", "adapter_models", ["org_id"])


def downgrade() -> None:
    op.drop_table("adapter_models")
    op.drop_table("fine_tuning_checkpoints")
    op.drop_table("fine_tuning_events")
    op.drop_table("fine_tuning_jobs")
