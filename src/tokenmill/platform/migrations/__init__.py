"""Alembic migrations of the platform schema; applied with `tokenmill.platform.migrate.upgrade`."""
