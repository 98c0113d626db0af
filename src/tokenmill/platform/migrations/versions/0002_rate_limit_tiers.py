"""Rate-limit tiers as rows: the built-in tiers, plus one for every tier name organizations already use.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "free_requests_per_minute",
    "free_tokens_per_minute",
    "free_max_concurrent_requests",
)
# Written out, not imported: a migration must keep meaning what it meant when it shipped. Paid limits, then
# free ones; None is unlimited. Generous enough that a quick-start key serves a team's SDK at once.
_BUILT_IN: dict[str, tuple[int | None, ...]] = {
    "default": (600, 1_000_000, 32, 120, 200_000, 16),
    "pro": (6_000, 10_000_000, 256, 1_200, 2_000_000, 64),
    "unlimited": (None, None, None, None, None, None),
}


def upgrade() -> None:
    tiers = op.create_table(
        "rate_limit_tiers",
        sa.Column("name", sa.String(32), primary_key=True),
        *(sa.Column(column, sa.BigInteger(), nullable=True) for column in _LIMITS),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        *(sa.CheckConstraint(f"{column} >= 1", name=f"ck_rate_limit_tiers_{column}") for column in _LIMITS),
    )
    # Organizations on a tier name that had no limits of its own were held to `default`'s: they keep that.
    in_use = op.get_bind().execute(sa.text("SELECT DISTINCT tier FROM organizations")).scalars()
    rows = {**{name: _BUILT_IN["default"] for name in in_use}, **_BUILT_IN}
    now = datetime.now(UTC)
    op.bulk_insert(
        tiers,
        [
            {"name": name, **dict(zip(_LIMITS, limits, strict=True)), "updated_at": now}
            for name, limits in rows.items()
        ],
    )


def downgrade() -> None:
    op.drop_table("rate_limit_tiers")
