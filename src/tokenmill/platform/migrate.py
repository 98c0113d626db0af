"""Apply the packaged Alembic migrations programmatically: `upgrade(url)` at startup creates or upgrades
the schema; nothing else in the platform creates tables."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from tokenmill.platform.db import WRITE_OPTION, Database, open_database

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x746F6B6D  # any constant shared by every tokenmill process


def alembic_config(database: Database | None = None) -> Config:
    """A Config without an ini file; `script_location` points into the installed package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database is not None:
        url = database.url.render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    return config


def upgrade(database: str | Database, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent). Accepts a URL or an open `Database`. Safe when several
    processes start at once: SQLite takes the write lock first, PostgreSQL an advisory lock."""
    db = open_database(database) if isinstance(database, str) else database
    try:
        config = alembic_config(db)
        with db.engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
            if db.dialect == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if isinstance(database, str):
            db.close()


def current_revision(database: Database) -> str | None:
    with database.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
