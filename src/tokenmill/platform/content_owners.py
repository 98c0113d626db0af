"""Every part of the platform that keeps organizations' content besides their files, for the data controls
(delete all, retention, export): the server and `tokenmill admin sweep-data` reach the same ones."""

from __future__ import annotations

from pathlib import Path

from tokenmill.platform.batch_data import batches_owner
from tokenmill.platform.data_controls import ContentOwner
from tokenmill.platform.db import Database
from tokenmill.platform.fine_tuning_data import fine_tuning_owner


def platform_owners(db: Database, data_dir: str | Path) -> tuple[ContentOwner, ...]:
    return (fine_tuning_owner(db, data_dir), batches_owner(db))
