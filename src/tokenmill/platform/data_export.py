"""Taking all of an organization's data away: one zip (`write_export`) of its usage, requests and ledger as
CSV, its files with their metadata, and what each `ContentOwner` keeps for it (data_controls.py), streamed
part by part so no file is held in memory whole."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from typing import Any, BinaryIO

from tokenmill.platform import accounts, files
from tokenmill.platform.data_controls import FACTS, ContentOwner
from tokenmill.platform.db import Database
from tokenmill.platform.file_store import FileStore
from tokenmill.platform.money import format_micros
from tokenmill.platform.statements import MAX_PAGE, ledger_page, recent_requests
from tokenmill.platform.usage import usage_report

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: object) -> object:
    """Text chosen by users (model names, notes) that starts like a formula is quoted, so a spreadsheet
    opening a CSV export shows it instead of evaluating it."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


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
    for line in _every_line(
        lambda after: recent_requests(db, org_id, start, end, limit=MAX_PAGE, after=after)
    ):
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


def _ledger_rows(db: Database, org_id: str) -> Iterator[list[object]]:
    for line in _every_line(lambda after: ledger_page(db, org_id, limit=MAX_PAGE, after=after)):
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


def _every_line(page_after: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every line of a statement read page by page, each page after the last line of the one before."""
    after = None
    while True:
        page = page_after(after)
        yield from page.lines
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
            writer.writerow([spreadsheet_cell(value) for value in row])


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
