"""A revision number the database bumps, by trigger, in every transaction that changes who may call what:
keys, organizations, tiers, listings or prices. A gateway remembers who a key is and which listing its
caller gets until this number moves (`read_cache.ReadCache`); being a trigger, it also moves for the admin
CLI, another gateway or a hand edit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# Written out, not imported: a migration keeps meaning what it meant when it shipped.
_TABLES = ("api_keys", "organizations", "rate_limit_tiers", "listings", "model_prices")
_OPERATIONS = ("INSERT", "UPDATE", "DELETE")
_BUMP = "UPDATE access_revision SET value = value + 1 WHERE id = 1"


def upgrade() -> None:
    op.create_table(
        "access_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_access_revision_one_row"),
    )
    op.execute("INSERT INTO access_revision (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "sqlite":  # row triggers only, with the statement inline
        for table in _TABLES:
            for operation in _OPERATIONS:
                op.execute(
                    f"CREATE TRIGGER bump_access_{table}_{operation.lower()} AFTER {operation} ON {table} "
                    f"BEGIN {_BUMP}; END"
                )
        return
    op.execute(
        "CREATE FUNCTION bump_access_revision() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN {_BUMP}; RETURN NULL; END $$"
    )
    for table in _TABLES:
        op.execute(
            f"CREATE TRIGGER bump_access_revision AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION bump_access_revision()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in _TABLES:
            for operation in _OPERATIONS:
                op.execute(f"DROP TRIGGER bump_access_{table}_{operation.lower()}")
    else:
        for table in _TABLES:
            op.execute(f"DROP TRIGGER bump_access_revision ON {table}")
        op.execute("DROP FUNCTION bump_access_revision()")
    op.drop_table("access_revision")
