"""An organization's statement, line by line: its requests as they were billed (one usage record each) and
its ledger entries, newest first, a page at a time. Both are keyset-paginated on the row id, which only
grows: the next page is everything below the last id seen, so rows written meanwhile (they get higher ids)
never shift a page, and no row is skipped or shown twice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import select

from tokenmill.platform.db import Database
from tokenmill.platform.errors import InvalidArgument
from tokenmill.platform.ledger import sum_balance
from tokenmill.platform.tables import LEDGER_KINDS, ApiKey, LedgerEntry, UsageRecord
from tokenmill.platform.validation import optional_int, text

MAX_PAGE = 500
MAX_ID = 2**63 - 1
MAX_MODEL_CHARS = 200


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One billed request: its usage record, with the key that made it."""

    id: int
    created_at: datetime
    model: str
    key_id: str
    key_prefix: str
    key_name: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    latency_ms: int
    status: str


@dataclass(frozen=True, slots=True)
class LedgerLine:
    id: int
    created_at: datetime
    kind: str
    amount_micros: int
    note: str
    request_id: int | None
    """Charges: the usage record (`RequestLine.id`) of the request charged, so the two lists reconcile."""
    model: str | None
    """Charges: the model of that request."""


@dataclass(frozen=True, slots=True)
class RequestPage:
    lines: list[RequestLine]
    has_more: bool


@dataclass(frozen=True, slots=True)
class LedgerPage:
    lines: list[LedgerLine]
    has_more: bool
    balance_micros: int
    """Read in the same transaction as the page."""


def _page_args(limit: int, after: int | None) -> tuple[int, int | None]:
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"limit: must be an integer from 1 to {MAX_PAGE}")
    return limit, optional_int("after", after, minimum=1, maximum=MAX_ID)


def recent_requests(
    db: Database,
    org_id: str,
    start_date: date,
    end_date: date,
    *,
    model: str | None = None,
    limit: int = 100,
    after: int | None = None,
) -> RequestPage:
    """The organization's requests of these UTC days (both inclusive), newest first; `after` is the last id
    of the previous page. Only `org_id`'s rows are ever read."""
    limit, after = _page_args(limit, after)
    if start_date > end_date:
        raise InvalidArgument("start_date: must not be after end_date")
    query = (
        select(UsageRecord, ApiKey.prefix, ApiKey.name)
        .join(ApiKey, ApiKey.id == UsageRecord.key_id)
        .where(UsageRecord.org_id == org_id, UsageRecord.day >= start_date, UsageRecord.day <= end_date)
        .order_by(UsageRecord.id.desc())
        .limit(limit + 1)  # one more than asked: whether there is a next page, without a second query
    )
    if after is not None:
        query = query.where(UsageRecord.id < after)
    if model is not None:
        query = query.where(UsageRecord.model == text("model", model, max_len=MAX_MODEL_CHARS))
    with db.read() as session:
        rows = session.execute(query).all()
    lines = [
        RequestLine(
            id=record.id,
            created_at=record.created_at,
            model=record.model,
            key_id=record.key_id,
            key_prefix=prefix,
            key_name=name,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost_micros=record.cost_micros,
            latency_ms=record.latency_ms,
            status=record.status,
        )
        for record, prefix, name in rows[:limit]
    ]
    return RequestPage(lines=lines, has_more=len(rows) > limit)


def ledger_page(
    db: Database, org_id: str, *, limit: int = 100, after: int | None = None, kind: str | None = None
) -> LedgerPage:
    """The organization's ledger, newest first, and its balance. `kind` keeps one kind of entry (a year of
    per-request charges can bury the one top-up a person is looking for)."""
    limit, after = _page_args(limit, after)
    if kind is not None and kind not in LEDGER_KINDS:
        raise InvalidArgument(f"kind: must be one of {', '.join(LEDGER_KINDS)}")
    query = (
        select(LedgerEntry, UsageRecord.id, UsageRecord.model)
        .outerjoin(UsageRecord, UsageRecord.reservation_id == LedgerEntry.reservation_id)
        .where(LedgerEntry.org_id == org_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(LedgerEntry.id < after)
    if kind is not None:
        query = query.where(LedgerEntry.kind == kind)
    with db.read() as session:
        rows = session.execute(query).all()
        balance = sum_balance(session, org_id)
    lines = [
        LedgerLine(
            id=entry.id,
            created_at=entry.created_at,
            kind=entry.kind,
            amount_micros=entry.amount_micros,
            note=entry.note,
            request_id=request_id,
            model=model,
        )
        for entry, request_id, model in rows[:limit]
    ]
    return LedgerPage(lines=lines, has_more=len(rows) > limit, balance_micros=balance)
