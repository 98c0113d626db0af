"""Batches' part in the data controls: a batch keeps its requests and their answers in `batch_lines` (its
input, output and error files are Files, which the data controls reach already). Retention deletes the
lines of batches that closed longer ago than the organization keeps data; "delete all my data" cancels the
organization's open batches and deletes every line; the export holds each batch's lines."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session

from tokenmill.platform.batch_results import output_line
from tokenmill.platform.batches import OPEN
from tokenmill.platform.data_controls import ContentOwner
from tokenmill.platform.db import Database
from tokenmill.platform.tables import Batch, BatchLine

BATCHES_DIR = "batches"


def batches_owner(db: Database) -> ContentOwner:
    def delete_org(org_id: str) -> int:
        now = db.now()
        with db.write() as session:
            session.execute(
                update(Batch)
                .where(Batch.org_id == org_id, Batch.status.in_(OPEN))
                .values(
                    status="cancelled",
                    cancelling_at=func.coalesce(Batch.cancelling_at, now),
                    cancelled_at=now,
                )
            )
            return _delete_lines(session, select(Batch.id).where(Batch.org_id == org_id))

    def sweep(now: datetime, retention: Mapping[str, int]) -> int:
        closed = func.coalesce(Batch.completed_at, Batch.cancelled_at, Batch.expired_at, Batch.failed_at)
        deleted = 0
        with db.write() as session:
            for org_id, days in retention.items():
                old = select(Batch.id).where(
                    Batch.org_id == org_id, Batch.status.not_in(OPEN), closed < now - timedelta(days=days)
                )
                deleted += _delete_lines(session, old)
        return deleted

    def export(org_id: str, archive: zipfile.ZipFile) -> None:
        with db.read() as session:
            batch_ids = session.scalars(
                select(Batch.id).where(Batch.org_id == org_id).order_by(Batch.id)
            ).all()
        for batch_id in batch_ids:
            with db.read() as session:
                rows = session.scalars(
                    select(BatchLine).where(BatchLine.batch_id == batch_id).order_by(BatchLine.line)
                )
                text = "".join(
                    json.dumps({"line": row.line, "request": row.body, **output_line(batch_id, row)}) + "\n"
                    for row in rows
                )
            archive.writestr(f"{BATCHES_DIR}/{batch_id}.jsonl", text)

    return ContentOwner(name=BATCHES_DIR, delete_org=delete_org, sweep=sweep, export=export)


def _delete_lines(session: Session, batch_ids: Select[tuple[str]]) -> int:
    done = session.execute(delete(BatchLine).where(BatchLine.batch_id.in_(batch_ids)))
    return int(done.rowcount or 0)
