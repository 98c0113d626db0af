"""The operator's admin key: created on first start, written once to `<data_dir>/admin_key` (mode 0600),
never stored in clear. Rotation revokes every older admin key."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from tokenmill.platform.auth import ADMIN_KEY_PREFIX
from tokenmill.platform.db import Database
from tokenmill.platform.keys import generate_key, hash_key, visible_prefix
from tokenmill.platform.tables import AdminKey, new_id

logger = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin_key"
_BOOTSTRAP_LOCK = 0x746F6B61  # PostgreSQL advisory lock id: one bootstrap at a time across processes


def admin_key_path(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser() / ADMIN_KEY_FILE


def ensure_admin_key(db: Database, data_dir: str | Path) -> str | None:
    """On first start: create an admin key, write it to `<data_dir>/admin_key` (0600) and return it so the
    caller can print it once. Returns None when an active admin key already exists (even if its file
    was deleted: the secret is unrecoverable by design; use `rotate_admin_key`)."""
    with db.write() as session:
        _serialize_bootstrap(db, session)
        if session.scalar(select(AdminKey.id).where(AdminKey.revoked_at.is_(None)).limit(1)) is not None:
            return None
        raw = _insert(db, session, name="bootstrap")
        _write_secret_file(admin_key_path(data_dir), raw)  # before commit: a key nobody can read is useless
    logger.info("created the admin key; it was written to %s", admin_key_path(data_dir))
    return raw


def rotate_admin_key(db: Database, data_dir: str | Path) -> str:
    """Revoke every admin key and issue a new one (written to the same file)."""
    with db.write() as session:
        _serialize_bootstrap(db, session)
        session.execute(update(AdminKey).where(AdminKey.revoked_at.is_(None)).values(revoked_at=db.now()))
        raw = _insert(db, session, name="rotated")
        _write_secret_file(admin_key_path(data_dir), raw)
    logger.info("rotated the admin key; the new one was written to %s", admin_key_path(data_dir))
    return raw


def _serialize_bootstrap(db: Database, session: Session) -> None:
    # SQLite writers are already serialized; on PostgreSQL two gateways starting together must not both
    # see "no admin key" and create two.
    if db.dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BOOTSTRAP_LOCK})


def _insert(db: Database, session: Session, name: str) -> str:
    raw = generate_key(ADMIN_KEY_PREFIX)
    session.add(
        AdminKey(
            id=new_id("adm"),
            name=name,
            prefix=visible_prefix(raw, ADMIN_KEY_PREFIX),
            key_hash=hash_key(raw),
            created_at=db.now(),
            revoked_at=None,
        )
    )
    session.flush()
    return raw


def _write_secret_file(path: Path, secret: str) -> None:
    """Atomic replace of a file created with mode 0600 from the start (no window where it is readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask and ignored for an existing file
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
