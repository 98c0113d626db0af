"""What an organization controls about the data the platform keeps for it: how long its files are kept
(`file_retention_days`, enforced by `sweep`), deleting all of it at once (`delete_all_data`), and taking all of
it away (`write_export`, a zip). The content of requests (prompts, completions) is never stored anywhere:
usage records hold token counts, so there is nothing of it to retain, delete or export.

Files are this module's own content. Everything else an organization owns on disk (a fine-tuning job's
adapters and checkpoints, written by another part) is reached through `ContentOwner`s handed in at wiring
time: each can delete an organization's content, sweep what is past its retention and add it to an export,
so one "delete all my data" deletes all of it. `directory_owner` is the owner of content kept as plain
directories, `<root>/<org_id>/...`; `default_owners(data_dir)` are those the server wires by default."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import ColumnElement, select

from tokenmill.platform import accounts, audit, files
from tokenmill.platform.db import Database
from tokenmill.platform.errors import ConfirmationMismatch
from tokenmill.platform.file_store import FileStore, check_key
from tokenmill.platform.money import format_micros
from tokenmill.platform.statements import MAX_PAGE, ledger_page, recent_requests
from tokenmill.platform.tables import DataControl, StoredFile
from tokenmill.platform.usage import usage_report
from tokenmill.platform.validation import optional_int

MAX_RETENTION_DAYS = 36_500
FACTS = {
    "stores_request_content": False,
    "usage_records": "counts only: model, token counts, cost, latency and status; never prompts or outputs",
}
"""What is true of every organization's data, reported with its settings."""
_PAGE = 500
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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


# -- export ----------------------------------------------------------------------------------------------


def write_export(
    db: Database,
    store: FileStore,
    org_id: str,
    out: BinaryIO,
    *,
    owners: Sequence[ContentOwner] = (),
) -> list[str]:
    """Write a zip of everything the platform keeps for the organization to `out` (a seekable binary
    file), streaming each part (no file is held in memory whole): `usage.csv` (per UTC day and model, as
    GET /v1/usage?format=csv), `requests.csv` (each request as billed), `ledger.csv`, `files.json` (the
    files' metadata) with each file's bytes under `files/<file id>/<filename>`, each owner's content under
    `<owner name>/`, and `manifest.json` listing what is inside. Returns the names written."""
    org = accounts.get_organization(db, org_id)
    now = db.now()
    start, end = org.created_at.date(), max(now.date(), org.created_at.date())
    names: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        _csv(archive, "usage.csv", USAGE_COLUMNS, _usage_rows(db, org.id, start, end))
        _csv(archive, "requests.csv", REQUEST_COLUMNS, _request_rows(db, org.id, start, end))
        _csv(archive, "ledger.csv", LEDGER_COLUMNS, _ledger_rows(db, org.id))
        names += ["usage.csv", "requests.csv", "ledger.csv"]
        described = []
        for info in files.org_files(db, org.id):
            member = f"files/{info.id}/{_safe_name(info.filename)}"
            present = _copy_blob(archive, store, info, member)
            described.append(_file_entry(info, member if present else None))
            if present:
                names.append(member)
        archive.writestr("files.json", json.dumps(described, indent=2, ensure_ascii=False))
        names.append("files.json")
        for owner in owners:
            if owner.export is not None:
                before = set(archive.namelist())
                owner.export(org.id, archive)
                names += [name for name in archive.namelist() if name not in before]
        manifest = {
            "organization": {"id": org.id, "name": org.name},
            "exported_at": now.isoformat(),
            "period": {"start_date": start.isoformat(), "end_date": end.isoformat()},
            "facts": FACTS,
            "contents": [*names, "manifest.json"],
        }
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return [*names, "manifest.json"]


USAGE_COLUMNS = (
    "date",
    "model",
    "num_requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "cost_micros",
)
REQUEST_COLUMNS = (
    "id",
    "created_at",
    "model",
    "key_prefix",
    "key_name",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms",
    "status",
)
LEDGER_COLUMNS = ("id", "created_at", "kind", "amount", "amount_micros", "note", "request_id", "model")


def _usage_rows(db: Database, org_id: str, start: date, end: date) -> Iterator[list[object]]:
    for row in usage_report(db, org_id, start, end):
        yield [
            row.day.isoformat(),
            row.model,
            row.num_requests,
            row.prompt_tokens,
            row.completion_tokens,
            row.prompt_tokens + row.completion_tokens,
            format_micros(row.cost_micros),
            row.cost_micros,
        ]


def _request_rows(db: Database, org_id: str, start: date, end: date) -> Iterator[list[object]]:
    after = None
    while True:
        page = recent_requests(db, org_id, start, end, limit=MAX_PAGE, after=after)
        for line in page.lines:
            yield [
                line.id,
                line.created_at.isoformat(),
                line.model,
                line.key_prefix,
                line.key_name,
                line.prompt_tokens,
                line.completion_tokens,
                line.cost_micros,
                line.latency_ms,
                line.status,
            ]
        if not page.has_more or not page.lines:
            return
        after = page.lines[-1].id


def _ledger_rows(db: Database, org_id: str) -> Iterator[list[object]]:
    after = None
    while True:
        page = ledger_page(db, org_id, limit=MAX_PAGE, after=after)
        for line in page.lines:
            yield [
                line.id,
                line.created_at.isoformat(),
                line.kind,
                format_micros(line.amount_micros),
                line.amount_micros,
                line.note,
                line.request_id,
                line.model,
            ]
        if not page.has_more or not page.lines:
            return
        after = page.lines[-1].id


def _csv(archive: zipfile.ZipFile, name: str, columns: Sequence[str], rows: Iterable[list[object]]) -> None:
    with (
        archive.open(name, "w", force_zip64=True) as raw,
        io.TextIOWrapper(raw, encoding="utf-8", newline="") as text_out,
    ):
        writer = csv.writer(text_out, lineterminator="\r\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(value) for value in row])


def _cell(value: object) -> object:
    """Text chosen by users (model names, notes) that starts like a formula is quoted, so a spreadsheet
    shows it instead of evaluating it."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def _copy_blob(archive: zipfile.ZipFile, store: FileStore, info: files.FileInfo, member: str) -> bool:
    try:
        source = store.open(info.storage_key)
    except FileNotFoundError:
        return False
    with source, archive.open(member, "w", force_zip64=True) as target:
        shutil.copyfileobj(source, target, 1 << 16)
    return True


def _file_entry(info: files.FileInfo, member: str | None) -> dict[str, object]:
    return {
        "id": info.id,
        "object": "file",
        "bytes": info.bytes,
        "created_at": int(info.created_at.timestamp()),
        "expires_at": None if info.expires_at is None else int(info.expires_at.timestamp()),
        "filename": info.filename,
        "purpose": info.purpose,
        "sha256": info.sha256,
        "content": member,  # the member holding its bytes; None when they are missing from storage
        "content_missing": member is None,
    }


def _safe_name(filename: str) -> str:
    """A zip member name that cannot climb out of its folder or hide as a dotfile."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    return name[:200] or "file"


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
