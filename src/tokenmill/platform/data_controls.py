"""What an organization controls about the data the platform keeps for it: how long its files are kept
(`file_retention_days`, enforced by `sweep`), deleting all of it at once (`delete_all_data`), and taking all of
it away (`data_export.write_export`, a zip). The content of requests (prompts, completions) is never stored anywhere:
usage records hold token counts, so there is nothing of it to retain, delete or export.

Files are this module's own content. Everything else an organization owns on disk (a fine-tuning job's
adapters and checkpoints, written by another part) is reached through `ContentOwner`s handed in at wiring
time: each can delete an organization's content, sweep what is past its retention and add it to an export,
so one "delete all my data" deletes all of it; the export itself is written by `data_export.py`. `directory_owner` is the owner of content kept as plain
directories, `<root>/<org_id>/...`; `default_owners(data_dir)` are those the server wires by default."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, select

from tokenmill.platform import accounts, audit, files
from tokenmill.platform.db import Database
from tokenmill.platform.errors import ConfirmationMismatch
from tokenmill.platform.file_store import FileStore, check_key
from tokenmill.platform.tables import DataControl, StoredFile
from tokenmill.platform.validation import optional_int

MAX_RETENTION_DAYS = 36_500
FACTS = {
    "stores_request_content": False,
    "usage_records": "counts only: model, token counts, cost, latency and status; never prompts or outputs",
}
"""What is true of every organization's data, reported with its settings."""
_PAGE = 500


@dataclass(frozen=True, slots=True)
class ContentOwner:
    """Content of organizations kept by some part of the platform, as data controls reach it."""

    name: str
    """Also its folder in an export."""
    delete_org: Callable[[str], int]
    """org_id -> how many items it deleted; afterwards nothing of that organization's content is left."""
    sweep: Callable[[datetime, Mapping[str, int]], int] | None = None
    """(now, {org_id: retention days} of the organizations that set one) -> items deleted."""
    export: Callable[[str, zipfile.ZipFile], None] | None = None
    """(org_id, archive): add the organization's content under `<name>/`."""


@dataclass(frozen=True, slots=True)
class DataControlsInfo:
    org_id: str
    file_retention_days: int | None
    """None: files are kept until deleted (or their own `expires_at`)."""
    updated_at: datetime | None
    """None: never set."""


@dataclass(frozen=True, slots=True)
class SweepReport:
    expired_files: int
    """Deleted because their `expires_at` passed."""
    retained_files: int
    """Deleted because they were older than their organization's retention."""
    owners: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.expired_files + self.retained_files + sum(self.owners.values())


@dataclass(frozen=True, slots=True)
class DeletionReport:
    org_id: str
    files: int
    bytes: int
    owners: dict[str, int]


# -- settings ------------------------------------------------------------------------------------------


def get_data_controls(db: Database, org_id: str) -> DataControlsInfo:
    with db.read() as session:
        row = session.get(DataControl, org_id)
    if row is None:
        return DataControlsInfo(org_id=org_id, file_retention_days=None, updated_at=None)
    return DataControlsInfo(org_id, row.file_retention_days, row.updated_at)


def set_data_controls(
    db: Database, org_id: str, *, file_retention_days: int | None, actor: str
) -> DataControlsInfo:
    """Audited (action `set_data_controls`, target the organization) when it changes anything."""
    actor = audit.actor_name(actor)
    days = optional_int("file_retention_days", file_retention_days, minimum=1, maximum=MAX_RETENTION_DAYS)
    before = get_data_controls(db, org_id)
    with db.write() as session:
        row = session.get(DataControl, org_id)
        if row is None:
            row = DataControl(org_id=org_id, file_retention_days=days, updated_at=db.now())
            session.add(row)
        else:
            row.file_retention_days = days
            row.updated_at = db.now()
        session.flush()
        after = DataControlsInfo(org_id, row.file_retention_days, row.updated_at)
    if before.file_retention_days != after.file_retention_days:
        audit.record(
            db,
            actor,
            "set_data_controls",
            org_id,
            {"file_retention_days": before.file_retention_days},
            {"file_retention_days": after.file_retention_days},
        )
    return after


def retention_days(db: Database) -> dict[str, int]:
    """{org_id: days} of every organization that set a retention."""
    query = select(DataControl.org_id, DataControl.file_retention_days).where(
        DataControl.file_retention_days.is_not(None)
    )
    with db.read() as session:
        return {org_id: int(days) for org_id, days in session.execute(query).all()}


# -- the sweeper ---------------------------------------------------------------------------------------


def sweep(
    db: Database, store: FileStore, *, now: datetime | None = None, owners: Sequence[ContentOwner] = ()
) -> SweepReport:
    """Delete, rows and bytes, every file past its `expires_at` and every file older than its
    organization's retention, then let each owner sweep its own content. Idempotent; safe to run from
    several processes at once (a file deleted by another is simply not counted)."""
    now = db.now() if now is None else now
    expired = _delete_all_matching(db, store, [StoredFile.expires_at <= now])
    retention = retention_days(db)
    retained = 0
    for org_id, days in retention.items():
        cutoff = now - timedelta(days=days)
        retained += _delete_all_matching(
            db, store, [StoredFile.org_id == org_id, StoredFile.created_at <= cutoff]
        )
    swept = {owner.name: owner.sweep(now, retention) for owner in owners if owner.sweep is not None}
    return SweepReport(expired_files=expired, retained_files=retained, owners=swept)


def _delete_all_matching(db: Database, store: FileStore, conditions: list[ColumnElement[bool]]) -> int:
    deleted = 0
    while True:
        query = select(StoredFile).where(*conditions).order_by(StoredFile.id).limit(_PAGE)
        with db.read() as session:
            page = [files.file_info(row) for row in session.scalars(query)]
        if not page:
            return deleted
        deleted += files.delete_stored(db, store, page)


# -- delete all my data ----------------------------------------------------------------------------------


def delete_all_data(
    db: Database,
    store: FileStore,
    org_id: str,
    *,
    confirm: object,
    actor: str,
    owners: Sequence[ContentOwner] = (),
) -> DeletionReport:
    """Delete every file of the organization (bytes and rows, and any stray bytes under its prefix in the
    store) and each owner's content of it. `confirm` must be the organization's exact name, else
    `ConfirmationMismatch` and nothing is deleted. Keys, users, the ledger and usage records stay: they are
    the account and its accounting (counts, not content). Audited as `delete_all_data`."""
    actor = audit.actor_name(actor)
    org = accounts.get_organization(db, org_id)
    if not isinstance(confirm, str) or confirm != org.name:
        raise ConfirmationMismatch("confirm: must be exactly the organization's name; nothing was deleted")
    num_files, num_bytes = 0, 0
    while True:
        page = list(_first(files.org_files(db, org.id, page_size=_PAGE), _PAGE))
        if not page:
            break
        num_files += files.delete_stored(db, store, page)
        num_bytes += sum(info.bytes for info in page)
    store.delete_prefix(org.id)  # bytes with no row: an upload that crashed before its row was written
    deleted = {owner.name: owner.delete_org(org.id) for owner in owners}
    report = DeletionReport(org_id=org.id, files=num_files, bytes=num_bytes, owners=deleted)
    audit.record(db, actor, "delete_all_data", org.id, None, report)
    return report


def _first(items: Iterator[files.FileInfo], count: int) -> Iterator[files.FileInfo]:
    for index, item in enumerate(items):
        if index == count:
            return
        yield item


# -- content kept as directories ---------------------------------------------------------------------------


def directory_owner(name: str, root: str | Path) -> ContentOwner:
    """The owner of content kept as `<root>/<org_id>/<item>/...` (an item: a job's directory). Delete:
    the organization's directory, whole. Sweep: each item whose newest file is older than the
    organization's retention. Export: every file, under `<name>/`."""
    root = Path(root)

    def org_dir(org_id: str) -> Path:
        check_key(org_id)
        return root / org_id

    def delete_org(org_id: str) -> int:
        directory = org_dir(org_id)
        if not directory.exists():
            return 0
        count = sum(1 for path in directory.rglob("*") if path.is_file())
        shutil.rmtree(directory)
        return count

    def sweep_org_dirs(now: datetime, retention: Mapping[str, int]) -> int:
        deleted = 0
        for org_id, days in retention.items():
            directory = org_dir(org_id)
            if not directory.is_dir():
                continue
            cutoff = (now - timedelta(days=days)).timestamp()
            for item in sorted(directory.iterdir()):
                if _newest_mtime(item) <= cutoff:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
                    deleted += 1
        return deleted

    def export(org_id: str, archive: zipfile.ZipFile) -> None:
        directory = org_dir(org_id)
        if not directory.is_dir():
            return
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, f"{name}/{path.relative_to(directory).as_posix()}")

    return ContentOwner(name=name, delete_org=delete_org, sweep=sweep_org_dirs, export=export)


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    if path.is_dir():
        for child in path.rglob("*"):
            newest = max(newest, child.stat().st_mtime)
    return newest
