"""Closing a batch: lines its completion window left unanswered are answered `batch_expired`, and the
answers go to an output file (successes) and an error file (failures), in line order, in OpenAI's line
shape; the batch then reads `completed`, `cancelled` or `expired`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select, update

from tokenmill.platform.batches import OPEN, BatchInfo, info
from tokenmill.platform.db import Database
from tokenmill.platform.file_store import FileStore
from tokenmill.platform.files import store_result_file
from tokenmill.platform.tables import Batch, BatchLine

EXPIRED_CODE = "batch_expired"


def expire_pending(db: Database, batch_id: str) -> int:
    """The completion window has passed: every line not yet answered is answered `batch_expired`."""
    now = db.now()
    error = {
        "code": EXPIRED_CODE,
        "message": "This request could not be executed before the completion window expired.",
    }
    with db.write() as session:
        done = session.execute(
            update(BatchLine)
            .where(BatchLine.batch_id == batch_id, BatchLine.status == "pending")
            .values(status="failed", status_code=None, result={"error": error}, finished_at=now)
        )
        row = session.get(Batch, batch_id)
        assert row is not None
        if row.expired_at is None:
            row.expired_at = now
        return int(done.rowcount or 0)  # type: ignore[attr-defined]


def finalize(db: Database, store: FileStore, batch_id: str) -> BatchInfo:
    """Write the answers to the output file (successes) and the error file (failures), in line order, and
    close the batch: `cancelled` if it was being cancelled, `expired` if its window passed, else
    `completed`. Safe to run again after a crash part way (the batch stays `finalizing` until the last
    write)."""
    with db.write() as session:
        row = session.get(Batch, batch_id)
        assert row is not None
        if row.status not in OPEN:
            return info(session, row)
        if row.status != "finalizing":
            row.status, row.finalizing_at = "finalizing", db.now()
        org_id, cancelled, expired = row.org_id, row.cancelling_at is not None, row.expired_at is not None
    output_id = _result_file(db, store, org_id, batch_id, "succeeded", "output")
    error_id = _result_file(db, store, org_id, batch_id, "failed", "errors")
    now = db.now()
    with db.write() as session:
        row = session.get(Batch, batch_id)
        assert row is not None
        row.output_file_id, row.error_file_id = output_id, error_id
        if cancelled:
            row.status, row.cancelled_at = "cancelled", now
        elif expired:
            row.status = "expired"
        else:
            row.status, row.completed_at = "completed", now
        return info(session, row)


def output_line(batch_id: str, row: BatchLine) -> dict[str, Any]:
    """A line of the output or error file, as OpenAI writes them: the HTTP response a request got, or (for
    a line that never ran) an `error` of its own."""
    error = None
    response = None
    if row.status_code is None:
        error = (row.result or {}).get("error")
    else:
        response = {"status_code": row.status_code, "request_id": row.request_id, "body": row.result}
    return {
        "id": _request_id(batch_id, row.line),
        "custom_id": row.custom_id,
        "response": response,
        "error": error,
    }


def _result_file(
    db: Database, store: FileStore, org_id: str, batch_id: str, status: str, name: str
) -> str | None:
    with db.read() as session:
        has_any = session.scalar(
            select(func.count()).where(BatchLine.batch_id == batch_id, BatchLine.status == status)
        )
    if not has_any:
        return None
    info = store_result_file(
        db,
        store,
        org_id,
        filename=f"{batch_id}_{name}.jsonl",
        purpose="batch_output",
        content=_jsonl(db, batch_id, status),
    )
    return info.id


def _jsonl(db: Database, batch_id: str, status: str, page: int = 500) -> Iterator[bytes]:
    """Read in pages so a 50,000-line batch is never all in memory."""
    after = 0
    while True:
        with db.read() as session:
            rows = session.scalars(
                select(BatchLine)
                .where(BatchLine.batch_id == batch_id, BatchLine.status == status, BatchLine.line > after)
                .order_by(BatchLine.line)
                .limit(page)
            ).all()
        if not rows:
            return
        yield "".join(json.dumps(output_line(batch_id, row)) + "\n" for row in rows).encode()
        after = rows[-1].line


def _request_id(batch_id: str, line: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]
