"""Batch API jobs over the `batches` and `batch_lines` tables.

A batch is created with its input already checked line by line (`LineSpec`): it starts `in_progress` with
its good lines `pending` and its bad ones answered with their error, or `failed` when the file itself was
refused. The gateway that created it (`owner`) answers its pending lines at batch priority; each answer is
written by `record_answer` inside the transaction that charges the line (`billing.settle(also=...)`), so a
line is answered and charged exactly once even when the server is killed in between. When nothing is left
to answer (or the batch was cancelled or expired) it is closed (`batch_results.finalize`)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tokenmill.platform.db import Database
from tokenmill.platform.errors import Conflict, InvalidArgument, NotFound
from tokenmill.platform.fine_tuning import Page
from tokenmill.platform.principal import KeyPrincipal
from tokenmill.platform.tables import Batch, BatchLine

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
"""OpenAI offers one window."""
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
OPEN = ("in_progress", "cancelling", "finalizing")
"""Statuses a dispatcher still has work in."""
_BATCH_ID_RE = re.compile(r"batch_[0-9a-f]{24}")


class BatchNotFound(NotFound):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No batch found with id '{batch_id}'.")


class LineAlreadyAnswered(Conflict):
    """Raised inside a settle transaction, which then rolls back: the line's charge is not taken twice."""


@dataclass(frozen=True, slots=True)
class LineSpec:
    """One input line as checked at creation: a request to run (`body`), or its error (`error`)."""

    line: int
    custom_id: str | None
    model: str | None = None
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    """OpenAI's error object ({message, type, param, code}) for a line refused up front."""
    status_code: int = 400


@dataclass(frozen=True, slots=True)
class BatchSpec:
    endpoint: str
    input_file_id: str
    completion_window: str
    discount_bps: int
    owner: str
    metadata: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BatchInfo:
    id: str
    org_id: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    discount_bps: int
    status: str
    owner: str
    errors: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
    request_counts: RequestCounts


@dataclass(frozen=True, slots=True)
class PendingLine:
    batch_id: str
    line: int
    custom_id: str
    model: str
    body: dict[str, Any]


# -- the API's side ----------------------------------------------------------------------------------


def create_batch(
    db: Database,
    principal: KeyPrincipal,
    spec: BatchSpec,
    lines: list[LineSpec],
    file_errors: list[dict[str, Any]] | None = None,
) -> BatchInfo:
    """One transaction: the batch and all its lines, or nothing. `file_errors` (the input file refused as
    a whole) makes a `failed` batch with no lines."""
    if spec.endpoint not in ENDPOINTS:
        raise InvalidArgument(f"endpoint: must be one of {', '.join(ENDPOINTS)}")
    window = COMPLETION_WINDOWS.get(spec.completion_window)
    if window is None:
        raise InvalidArgument(f"completion_window: must be one of {', '.join(COMPLETION_WINDOWS)}")
    now = db.now()
    row = Batch(
        id=f"batch_{secrets.token_hex(12)}",
        org_id=principal.org_id,
        key_id=principal.key_id,
        endpoint=spec.endpoint,
        input_file_id=spec.input_file_id,
        completion_window=spec.completion_window,
        discount_bps=spec.discount_bps,
        status="failed" if file_errors else "in_progress",
        owner=spec.owner,
        errors=file_errors or None,
        user_metadata=spec.metadata,
        created_at=now,
        expires_at=now + window,
        in_progress_at=None if file_errors else now,
        failed_at=now if file_errors else None,
    )
    with db.write() as session:
        session.add(row)
        session.flush()
        if not file_errors:
            session.add_all(_line_row(row.id, spec_line, now) for spec_line in lines)
    return get_batch(db, principal.org_id, row.id)


def get_batch(db: Database, org_id: str, batch_id: str) -> BatchInfo:
    with db.read() as session:
        return info(session, _own_row(session, org_id, batch_id))


def find_foreign_batch(db: Database, org_id: str, batch_id: str) -> bool:
    """Whether `batch_id` is another organization's (for the audit log)."""
    with db.read() as session:
        row = session.get(Batch, batch_id)
    return row is not None and row.org_id != org_id


def list_batches(db: Database, org_id: str, *, after: str | None, limit: int) -> Page[BatchInfo]:
    """Newest first; `after` is the last batch id of the previous page."""
    query = select(Batch).where(Batch.org_id == org_id)
    with db.read() as session:
        if after is not None:
            cursor = _own_row(session, org_id, after)
            query = query.where(
                (Batch.created_at < cursor.created_at)
                | ((Batch.created_at == cursor.created_at) & (Batch.id < cursor.id))
            )
        rows = session.scalars(
            query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
        ).all()
        return Page([info(session, row) for row in rows[:limit]], len(rows) > limit)


def cancel_batch(db: Database, org_id: str, batch_id: str) -> BatchInfo:
    """`in_progress` -> `cancelling`: no new line starts and the dispatcher stops the lines running (they
    are charged nothing; lines already answered stay answered and charged), then closes the batch as
    `cancelled`. Cancelling a batch that is already cancelling is harmless; one that has closed is a
    conflict."""
    with db.write() as session:
        row = _own_row(session, org_id, batch_id, lock=True)
        if row.status == "in_progress":
            row.status, row.cancelling_at = "cancelling", db.now()
        elif row.status != "cancelling":
            raise Conflict(f"Batch '{batch_id}' cannot be cancelled: it is {row.status}.")
    return get_batch(db, org_id, batch_id)


# -- the dispatcher's side ---------------------------------------------------------------------------


def open_batches(db: Database, owner: str) -> list[BatchInfo]:
    """The batches `owner` still has work in, oldest first (lines are dispatched in that order)."""
    with db.read() as session:
        rows = session.scalars(
            select(Batch)
            .where(Batch.owner == owner, Batch.status.in_(OPEN))
            .order_by(Batch.created_at, Batch.id)
        ).all()
        return [info(session, row) for row in rows]


def pending_lines(db: Database, batch_id: str, *, after_line: int, limit: int) -> list[PendingLine]:
    with db.read() as session:
        rows = session.scalars(
            select(BatchLine)
            .where(BatchLine.batch_id == batch_id, BatchLine.status == "pending", BatchLine.line > after_line)
            .order_by(BatchLine.line)
            .limit(limit)
        ).all()
    return [PendingLine(batch_id, r.line, r.custom_id or "", r.model or "", r.body or {}) for r in rows]


def record_answer(
    session: Session,
    batch_id: str,
    line: int,
    *,
    status_code: int | None,
    request_id: str | None,
    result: dict[str, Any],
    now: datetime,
) -> None:
    """Answer a pending line inside the caller's transaction; `LineAlreadyAnswered` (rolling the whole
    transaction back, the line's charge included) if another attempt got there first."""
    done = session.execute(
        update(BatchLine)
        .where(BatchLine.batch_id == batch_id, BatchLine.line == line, BatchLine.status == "pending")
        .values(
            status="succeeded" if status_code == 200 else "failed",
            status_code=status_code,
            request_id=request_id,
            result=result,
            finished_at=now,
        )
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
        raise LineAlreadyAnswered(f"batch {batch_id} line {line} was already answered")


def fail_line(
    db: Database, batch_id: str, line: int, *, status_code: int, request_id: str, error: dict[str, Any]
) -> None:
    """Answer a pending line with an error it got without any charge (refused, or failed in the engine)."""
    with db.write() as session:
        record_answer(
            session,
            batch_id,
            line,
            status_code=status_code,
            request_id=request_id,
            result={"error": error},
            now=db.now(),
        )


# -- internals ---------------------------------------------------------------------------------------


def _line_row(batch_id: str, spec: LineSpec, now: datetime) -> BatchLine:
    if spec.error is None:
        return BatchLine(
            batch_id=batch_id,
            line=spec.line,
            custom_id=spec.custom_id,
            model=spec.model,
            body=spec.body,
            status="pending",
        )
    return BatchLine(
        batch_id=batch_id,
        line=spec.line,
        custom_id=spec.custom_id,
        model=spec.model,
        status="failed",
        status_code=spec.status_code,
        request_id=None,
        result={"error": spec.error},
        finished_at=now,
    )


def _own_row(session: Session, org_id: str, batch_id: str, *, lock: bool = False) -> Batch:
    if not isinstance(batch_id, str) or not _BATCH_ID_RE.fullmatch(batch_id):
        raise BatchNotFound(str(batch_id)[:64])
    query = select(Batch).where(Batch.id == batch_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None or row.org_id != org_id:
        raise BatchNotFound(batch_id)
    return row


def _counts(session: Session, batch_id: str) -> RequestCounts:
    rows = session.execute(
        select(BatchLine.status, func.count())
        .where(BatchLine.batch_id == batch_id)
        .group_by(BatchLine.status)
    ).all()
    by_status = {status: int(count) for status, count in rows}
    return RequestCounts(
        total=sum(by_status.values()),
        completed=by_status.get("succeeded", 0),
        failed=by_status.get("failed", 0),
    )


def info(session: Session, row: Batch) -> BatchInfo:
    """The batch as the API shows it, its request counts read in `session`."""
    return BatchInfo(
        id=row.id,
        org_id=row.org_id,
        key_id=row.key_id,
        endpoint=row.endpoint,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        discount_bps=row.discount_bps,
        status=row.status,
        owner=row.owner,
        errors=row.errors,
        metadata=row.user_metadata,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        in_progress_at=row.in_progress_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        request_counts=_counts(session, row.id),
    )
